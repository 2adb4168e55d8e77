-- delete: remove every key of the session, lease and epoch included.
-- ARGV[4..] further key names the client found by a SCAN of the session's prefix
-- (remains of a session that lost its head, which the head cannot list); only names
-- under this session's prefix are deleted.
-- Reply: {'ok', existed 0/1}. Foreign data at the head's name is removed too (the
-- caller asked for the key to be gone), but then only the head can be found.
local function remains()
  local n = 0
  for i = 4, #ARGV do
    if string.sub(ARGV[i], 1, #PREFIX) == PREFIX then
      n = n + redis.call('DEL', ARGV[i])
    end
  end
  return n
end

local function main()
  local t = type_of(HEAD)
  if t == 'none' then
    if remains() > 0 then return {'ok', 1} end
    return {'ok', 0}
  end
  local ok, s, expired = pcall(live_head, true)
  if not ok then
    redis.call('DEL', HEAD)
    remains()
    return {'ok', 1}
  end
  if s then delete_all(s) end
  local gone = remains()
  if expired and gone == 0 then return {'ok', 0} end
  return {'ok', 1}
end

return run(main)
