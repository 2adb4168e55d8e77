-- acquire: take the lease. A free or expired lease, or one the owner already holds, is
-- granted; another owner's live lease only with takeover. Every acquisition that is not
-- the owner renewing its live lease gets the next fencing epoch.
-- ARGV[4] owner, [5] lease ttl seconds, [6] takeover '1'/'0', [7] event channel
-- ('' = none), [8] session key (for the event), [9] '1' = the namespace index lists
-- the key: a missing head may have been evicted, so do not create one (the client scans
-- for remains first, then calls again with '0'), [10] the epoch of the key's tombstone
-- (tombstone.lua; absent or '' = none): a session created starts above it.
-- Reply: {'ok', epoch, expires, created 0/1[, why the takeover event was not
--        published]} | {'busy', holder, epoch} |
--        {'absent'} (only with [9] = '1') | {'remains', a key of the session without
--        head} | {'corrupt', message}. Nothing is written unless the reply is 'ok'.
local function main()
  local owner = ARGV[4]
  local s = live_head(true)
  local created = 0
  if s == nil then
    local remain = first_remain()
    if remain then return {'remains', remain} end
    if ARGV[9] == '1' then return {'absent'} end
    s = new_head()
    local tomb = ARGV[10] and tonumber(ARGV[10])
    if tomb and tomb > s.epoch then s.epoch = tomb end  -- whatever the clock did since
    created = 1
  end
  local live = s.expires ~= nil and s.expires > NOW
  local previous = nil
  if not (live and s.owner == owner) then
    if live and s.owner ~= nil then
      if ARGV[6] ~= '1' then return {'busy', s.owner, s.epoch} end
      previous = s.owner
    end
    s.epoch = s.epoch + 1
  end
  local expires = NOW + tonumber(ARGV[5])
  s.touched = NOW
  write_head(s)
  redis.call('HSET', HEAD, 'owner', owner, 'expires', fmt(expires))
  refresh_ttl(s)
  if previous ~= nil and ARGV[7] ~= '' then
    -- the epoch spliced in as written by fmt: cjson prints numbers with 14 digits, and
    -- an epoch (microseconds since 1970) has 16
    local body = cjson.encode({
      event = 'taken_over', key = ARGV[8], owner = owner, previous_owner = previous})
    -- as commit.lua: the takeover is written, and stands whether or not it is heard
    local published = redis.pcall(
      'PUBLISH', ARGV[7], '{"epoch":' .. fmt(s.epoch) .. ',' .. string.sub(body, 2))
    if type(published) == 'table' and published.err then
      return {'ok', s.epoch, fmt(expires), created, published.err}
    end
  end
  return {'ok', s.epoch, fmt(expires), created}
end

return run(main)
