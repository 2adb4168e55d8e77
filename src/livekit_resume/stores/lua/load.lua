-- load: one version and the log records it reads, in one atomic read.
-- ARGV[4] version ('' = latest).
-- Reply: {'ok', version, epoch, created, head, info, {records...}} |
--        {'absent', '1' if there is no head at all, a key left without head or ''} |
--        {'missing', oldest, latest} | {'corrupt', message}
local function main()
  local s, expired = live_head(false)
  if s == nil and not expired then return {'absent', '1', first_remain() or ''} end
  if s == nil or s.version < s.oldest then return {'absent', '0', ''} end
  local n = s.version
  if ARGV[4] ~= '' then
    n = tonumber(ARGV[4])
    if n == nil or n < s.oldest or n > s.version then return {'missing', s.oldest, s.version} end
  end
  local vk = vkey(n)
  expect_type(vk, 'hash')
  local v = redis.call('HMGET', vk, 'epoch', 'created', 'head', 'info', 'gen', 'end')
  local gen, last = tonumber(v[5]), tonumber(v[6])
  if not v[1] or not v[2] or gen == nil or last == nil
      or not finite(last) or not counter(last) then
    settled()  -- lost, not on a node yet: that fails the script (a slot half moved)
    corrupt('version record ' .. vk .. ' is missing or incomplete')
  end
  local head, info = read_body(n, v[3], v[4])
  local records = {}
  if last > 0 then
    local lk = logkey(gen)
    expect_type(lk, 'list')
    records = redis.call('LRANGE', lk, 0, last - 1)
    if #records ~= last then
      settled()
      corrupt('log ' .. lk .. ' holds ' .. #records .. ' records, version ' .. n ..
        ' reads ' .. last)
    end
  end
  return {'ok', n, v[1], v[2], head, info, records}
end

return run(main)
