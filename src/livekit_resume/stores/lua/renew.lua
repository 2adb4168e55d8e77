-- renew: extend a lease that is still current (same epoch and owner).
-- ARGV[4] owner, [5] epoch, [6] lease ttl seconds.
-- Reply: {'ok', expires, version} | {'lost', current epoch or ''} | {'corrupt', message}
local function main()
  local s = live_head(true)
  if s == nil then return {'lost', ''} end
  if s.epoch ~= tonumber(ARGV[5]) or s.owner ~= ARGV[4] then return {'lost', fmt(s.epoch)} end
  local expires = NOW + tonumber(ARGV[6])
  s.touched = NOW
  redis.call('HSET', HEAD, 'expires', fmt(expires), 'touched', fmt(NOW))
  refresh_ttl(s)
  return {'ok', fmt(expires), fmt(s.version)}
end

return run(main)
