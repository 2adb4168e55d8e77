-- info: the session's latest version, epoch, live lease and listing info.
-- Reply: {'ok', version, epoch, touched, info or '', {owner, expires} or {}, now} |
--        {'absent', '1' if there is no head at all, a key left without head or ''} |
--        {'corrupt', message}  (the 'absent' reply is load's)
local function main()
  local s, expired = live_head(false)
  if s == nil and not expired then return {'absent', '1', first_remain() or ''} end
  if s == nil then return {'absent', '0', ''} end
  local info = ''
  if s.version >= s.oldest then
    local vk = vkey(s.version)
    if expect_type(vk, 'hash') == 'none' then
      settled()
      corrupt('version record ' .. vk .. ' is missing')
    end
    local v = redis.call('HMGET', vk, 'head', 'info')
    info = select(2, read_body(s.version, v[1], v[2]))
  end
  local lease = {}
  if s.owner ~= nil and s.expires ~= nil and s.expires > NOW then
    lease = {s.owner, fmt(s.expires)}
  end
  return {'ok', s.version, fmt(s.epoch), fmt(s.touched), info, lease, fmt(NOW)}
end

return run(main)
