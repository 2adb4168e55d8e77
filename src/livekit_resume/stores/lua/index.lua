-- index: record a session in its namespace's sorted set, and forget expired ones.
-- KEYS[1] the index "<ns>:sessions" (its own slot: it is never touched by a session
-- script). Member: the session key; score: when it was last recorded, or +inf for a
-- store without TTL (never collected). A live session is re-recorded at least every
-- quarter TTL, so a member older than ARGV[2] (two TTLs) is dead and removed.
-- Runs behind clock.lua (NOW), not behind the session prelude.
-- ARGV[1] now (see clock.lua), [2] horizon seconds ('' = no collection),
-- [3] session key, [4] '1' = score +inf.
-- Reply: {score, 1 if the key was listed before this call else 0}.
local score = fmt(NOW)
if ARGV[4] == '1' then score = '+inf' end
-- Collected before the key is looked up: a member dead for two TTLs says nothing about
-- the key (its session expired), and a key it listed would send its acquire to scan the
-- whole keyspace for remains of an evicted head.
if ARGV[2] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. fmt(NOW - tonumber(ARGV[2])))
end
local current = redis.call('ZSCORE', KEYS[1], ARGV[3])
if not current or (current ~= 'inf' and tonumber(current) < tonumber(score)) then
  redis.call('ZADD', KEYS[1], score, ARGV[3])
end
if current then return {score, 1} end
return {score, 0}
