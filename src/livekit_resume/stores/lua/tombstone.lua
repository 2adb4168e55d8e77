-- tombstone: what a delete leaves (RedisStore.delete), laid before the delete script
-- runs, so that a holder finding its session gone always finds it too: the highest
-- epoch deleted under the key, never lowered, for its time to live.
-- KEYS[1] "<ns>:rm:<SHA-256 of the session key>{<slot tag>}", or the same without the
-- tag as earlier releases name it (no key in clear: rm leaves no trace of it),
-- ARGV[1] the epoch, [2] the time to live in milliseconds, [3] now in seconds ('' or
-- absent: the server's TIME). The epoch laid is the clock's in microseconds if
-- that is higher (log.tombstone_epoch: a takeover the store forgot is fenced too).
-- Reply: 1 | why it could not be laid (a user whose ACL has no GET or SET; foreign data
-- at the name, which the client deletes before it lays the tombstone again).
local now = ARGV[3] and ARGV[3] ~= '' and tonumber(ARGV[3]) or nil
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local epoch = math.max(tonumber(ARGV[1]), math.floor(now * 1000000))
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'table' and cur.err then return cur.err end
-- digits only, as the client reads an epoch (Lua's tonumber would take '1e300' or hex)
if cur and not string.match(cur, '^%d+$') then return 'it holds no epoch: foreign data, kept' end
if cur and tonumber(cur) >= epoch then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
local set = redis.pcall('SET', KEYS[1], string.format('%.17g', epoch), 'PX', ARGV[2])
if type(set) == 'table' and set.err then return set.err end
return 1
