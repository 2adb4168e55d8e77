-- delete: remove every key of the session, lease and epoch included.
-- ARGV[4] owner and [5] epoch of the lease the delete is fenced by ('' and '' = not
-- fenced; '' and an epoch = only while the session is at that epoch, the one the
-- client's tombstone was laid for (tombstone.lua), 0 = only while there is none); [6]
-- '1' once the client has looked
-- for remains, then [7..] the key names it found by a SCAN of the session's prefix
-- (remains of a session that lost its head, which the head cannot list); only names
-- under this session's prefix are deleted.
-- Reply: {'ok', existed 0/1} | {'lost', current epoch} (fenced, and another writer
-- holds the key now; or not at the epoch given: nothing deleted) | {'scan'} (no head,
-- or a damaged one, and [6] is not '1': nothing deleted; the client scans, O(keys in
-- the database), and calls again). Foreign data at the head's name is removed too (the
-- caller asked for the key to be gone), but then only the head can be found.
local function remains()
  local n = 0
  for i = 7, #ARGV do
    if string.sub(ARGV[i], 1, #PREFIX) == PREFIX then
      n = n + redis.call('DEL', ARGV[i])
    end
  end
  return n
end

local function main()
  -- the remains looked at (TYPE: the documented ACL grants it) before the first DEL, as
  -- delete_all does with the session's
  for i = 7, #ARGV do
    if string.sub(ARGV[i], 1, #PREFIX) == PREFIX then redis.call('TYPE', ARGV[i]) end
  end
  local scanned = ARGV[6] == '1'
  local t = type_of(HEAD)
  if t == 'none' then
    if not scanned then return {'scan'} end
    if remains() > 0 then return {'ok', 1} end
    return {'ok', 0}
  end
  local fenced = ARGV[4] ~= ''
  local ok, s, expired = pcall(live_head, true)
  if not ok and fenced then error(s, 0) end  -- no epoch to check a corrupt head's holder by
  if not ok then
    if not scanned then return {'scan'} end
    redis.call('DEL', HEAD)
    remains()
    return {'ok', 1}
  end
  local at = ARGV[5] ~= '' and tonumber(ARGV[5])
  if s and at and (s.epoch ~= at or (fenced and s.owner ~= ARGV[4])) then
    return {'lost', fmt(s.epoch)}
  end
  if s then
    -- the whole session, or nothing: a key it names absent here is on the old node of a
    -- slot half moved (refused: StoreUnavailable), or was evicted, which the client
    -- tells apart and then calls again, scanned, to delete what is left
    if not scanned then assert_whole(s) end
    delete_all(s)
  end
  local gone = remains()
  if expired and gone == 0 then return {'ok', 0} end
  return {'ok', 1}
end

return run(main)
