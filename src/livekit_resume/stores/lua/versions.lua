-- versions: the retained versions, oldest first.
-- Reply: {'ok', {{version, epoch, created, size, info}...}} | {'corrupt', message}
local function main()
  local s = live_head(false)
  local out = {}
  if s == nil then return {'ok', out} end
  for n = s.oldest, s.version do
    local vk = vkey(n)
    expect_type(vk, 'hash')
    local v = redis.call('HMGET', vk, 'epoch', 'created', 'size', 'info')
    if not v[1] or not v[2] or not v[3] or not v[4] then
      corrupt('version record ' .. vk .. ' is missing or incomplete')
    end
    out[#out + 1] = {n, v[1], v[2], v[3], v[4]}
  end
  return {'ok', out}
end

return run(main)
