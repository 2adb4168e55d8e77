-- Prelude of every script that needs the time (Redis has no include: the store prepends
-- it, before session.lua for the session scripts, alone before index.lua).
--
-- ARGV[1] is always "now" in seconds: '' = the server's TIME, the default; a value only
-- when the store was given a clock for tests. Times are written as "%.17g" strings, so a
-- float survives the trip exactly.

local function fmt(x) return string.format('%.17g', x) end

local NOW
if ARGV[1] ~= '' then
  NOW = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
