-- release: give the lease up if still current; the epoch counter stays.
-- ARGV[4] owner, [5] epoch.  Reply: {'ok', released 0/1} | {'corrupt', message}
local function main()
  local s = live_head(true)
  if s == nil or s.epoch ~= tonumber(ARGV[5]) or s.owner ~= ARGV[4] then return {'ok', 0} end
  redis.call('HDEL', HEAD, 'owner', 'expires')
  return {'ok', 1}
end

return run(main)
