-- versions: the retained versions, oldest first.
-- Reply: {'ok', {{version, epoch, created, size, info}...}} | {'corrupt', message}
local function main()
  local s = live_head(false)
  local out = {}
  if s == nil then return {'ok', out} end
  for n = s.oldest, s.version do
    local vk = vkey(n)
    expect_type(vk, 'hash')
    local v = redis.call('HMGET', vk, 'epoch', 'created', 'size', 'head', 'info')
    if not v[1] or not v[2] or not v[3] then
      corrupt('version record ' .. vk .. ' is missing or incomplete')
    end
    local _, info = read_body(n, v[4], v[5])
    out[#out + 1] = {n, v[1], v[2], v[3], info}
  end
  return {'ok', out}
end

return run(main)
