-- acquire: take the lease. A free or expired lease, or one the owner already holds, is
-- granted; another owner's live lease only with takeover. Every acquisition that is not
-- the owner renewing its live lease gets a new fencing epoch: the next one, or the
-- clock's in microseconds if that is higher. A reclaim (base.acquired_epoch, the rule
-- this follows) is granted at its own epoch where the store's is below it.
-- ARGV[4] owner, [5] lease ttl seconds, [6] takeover '1'/'0', [7] event channel
-- ('' = none), [8] session key (for the event), [9] the epoch reclaimed ('' = none),
-- [10] '1' = the namespace index lists
-- the key: a missing head may have been evicted, so do not create one (the client scans
-- for remains first, then calls again with '0'), [11] the epoch of the key's tombstone
-- (tombstone.lua; absent or '' = none): a session created starts above it.
-- Reply: {'ok', epoch, expires, created 0/1[, why the takeover event was not
--        published]} | {'busy', holder, epoch} | {'stale', epoch} (a reclaim below the
--        store's epoch) | {'deleted', tombstone} (a reclaim at or below it) |
--        {'absent'} (only with [10] = '1') | {'remains', a key of the session without
--        head} | {'corrupt', message}. Nothing is written unless the reply is 'ok'.
local function main()
  local owner = ARGV[4]
  local reclaim = ARGV[9] ~= '' and tonumber(ARGV[9]) or nil
  local s = live_head(true)
  local created = 0
  local below = nil  -- the epoch a reclaim must be above
  if s == nil then
    local remain = first_remain()
    if remain then return {'remains', remain} end
    if ARGV[10] == '1' then return {'absent'} end
    s = new_head()
    local tomb = ARGV[11] and tonumber(ARGV[11])
    if tomb and tomb > s.epoch then s.epoch = tomb end  -- whatever the clock did since
    if reclaim and tomb and reclaim <= tomb then return {'deleted', fmt(tomb)} end
    below = 0
    created = 1
  else
    -- (not its own acquisition, landed with its reply lost: base.acquired_epoch)
    if reclaim and reclaim < s.epoch and s.owner ~= owner then
      return {'stale', fmt(s.epoch)}
    end
    below = s.epoch
  end
  local live = s.expires ~= nil and s.expires > NOW
  local previous = nil
  -- not above the clock: a holder that acquired since the loss, under a clock behind
  -- (below the reclaim), is never fenced by one it superseded
  if reclaim and reclaim > below and reclaim <= math.floor(NOW * 1000000) then
    if live and s.owner ~= nil and s.owner ~= owner then previous = s.owner end
    s.epoch = reclaim
  elseif reclaim and reclaim == s.epoch and s.owner == owner then
    -- its own lease, run out in the state the store went back to: kept (a new epoch
    -- would be above the holders the store forgot, and fence the newest)
  elseif not (live and s.owner == owner) then
    if live and s.owner ~= nil then
      if ARGV[6] ~= '1' then return {'busy', s.owner, s.epoch} end
      previous = s.owner
    end
    s.epoch = math.max(s.epoch + 1, math.floor(NOW * 1000000))
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
