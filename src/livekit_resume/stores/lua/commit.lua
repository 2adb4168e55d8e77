-- commit: append one version atomically.
-- ARGV[4] epoch, [5] base_version, [6] commit id, [7] head bytes, [8] info (msgpack;
-- head and info go to the version's body, see write_body),
-- [9] bytes written, [10] keep, [11] event channel ('' = none), [12] event payload,
-- [13] records in the elements, [14] lease ttl seconds ('' = leave the lease), [15] '1'
-- for a whole commit (its records clear each stream first), [16..] packed elements
-- (batches of records, or staged: see staged_keys), appended to the current log
-- generation; a whole commit whose base cannot be checked (its record or log lost)
-- starts a generation of its own, which reads nothing of the base.
-- Reply: {'ok', version, log_len (elements), gen, records in the log[, why the event
--        was not published]} |
--        {'lost', current epoch or ''} | {'moved', head version} |
--        {'unstaged'} (a staged element is gone: nothing written) | {'corrupt', message}
-- With a lease ttl, a commit that lands (or that a retry finds landed) renews a held
-- lease too: an owner is recorded, and the epoch checked is its holder's.
local function renew_lease(s)
  if ARGV[14] ~= '' and s.owner then
    redis.call('HSET', HEAD, 'expires', fmt(NOW + tonumber(ARGV[14])))
    return true
  end
  return false
end

local function main()
  local epoch = tonumber(ARGV[4])
  local base = tonumber(ARGV[5])
  local s = live_head(true)
  if s == nil then return {'lost', ''} end
  if s.epoch ~= epoch or epoch == 0 then return {'lost', fmt(s.epoch)} end
  if base ~= s.version then
    -- A retry of this very commit whose reply was lost: report it, don't refuse it.
    if s.version == base + 1 and s.version >= s.oldest then
      -- this very commit landed unheard, or another one: no record to tell
      if type_of(vkey(s.version)) == 'none' then
        settled()
        corrupt('version record ' .. vkey(s.version) .. ' is missing')
      end
      local done = redis.call('HMGET', vkey(s.version), 'cid', 'gen', 'end', 'records')
      if done[1] == ARGV[6] then
        -- checked before the lease is renewed: a nil would end the reply short
        if tonumber(done[2]) == nil or tonumber(done[3]) == nil then
          corrupt('version record ' .. vkey(s.version) .. ' is missing or incomplete')
        end
        if renew_lease(s) then  -- as renew.lua does: the session's expiry moves too
          s.touched = NOW
          redis.call('HSET', HEAD, 'touched', fmt(NOW))
          refresh_ttl(s)
        end
        return {'ok', s.version, tonumber(done[3]), tonumber(done[2]),
          tonumber(done[4]) or tonumber(done[3])}
      end
    end
    return {'moved', s.version}
  end
  local version = base + 1
  local lk = logkey(s.gen)
  local vk = vkey(version)
  -- records in the log so far, then with these (for compaction)
  local checked, records = pcall(check_log, s, lk)
  if not checked then
    if ARGV[15] ~= '1' or type(records) ~= 'table' or not records.lkresume_corrupt then
      error(records, 0)
    end
    settled()  -- the base's record or log lost, not on a node yet
    s.gen = s.gen + 1
    lk = logkey(s.gen)
    if type_of(lk) ~= 'none' then corrupt('key ' .. lk .. ' exists before its generation') end
    records = 0
  end
  records = records + tonumber(ARGV[13])
  for _, k in ipairs({vk, bkey(version)}) do
    if type_of(k) ~= 'none' then corrupt('key ' .. k .. ' exists before its version was written') end
  end
  local staged = staged_keys(16, #ARGV)
  if staged == nil then return {'unstaged'} end
  -- the versions and generations the trim deletes must be here (with a TTL, live_head
  -- looked at every key already)
  if TTL_MS == '' then assert_trim_here(s, version, tonumber(ARGV[10])) end
  -- checks done: from here on every call succeeds (write_body's SET may be refused,
  -- and then takes the other way)
  local len
  if #ARGV >= 16 then len = push_all(lk, 16, #ARGV, staged) else len = redis.call('LLEN', lk) end
  redis.call('HSET', vk, 'epoch', fmt(epoch), 'created', fmt(NOW), 'gen', s.gen, 'end', len,
    'size', ARGV[9], 'cid', ARGV[6], 'records', records)
  write_body(version, ARGV[7], ARGV[8])
  s.version = version
  s.touched = NOW
  trim(s, tonumber(ARGV[10]))
  write_head(s)
  renew_lease(s)
  refresh_ttl(s)
  -- after the writes, which a script never undoes: a refusal (a user without the
  -- channel) must not fail a commit that landed; it is reported to the caller instead
  local published = ARGV[11] == '' or redis.pcall('PUBLISH', ARGV[11], ARGV[12])
  if type(published) == 'table' and published.err then
    return {'ok', version, len, s.gen, records, published.err}
  end
  return {'ok', version, len, s.gen, records}
end

return run(main)
