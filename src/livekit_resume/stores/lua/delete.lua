-- delete: remove every key of the session, lease and epoch included.
-- Reply: {'ok', existed 0/1}. Foreign data at the head's name is removed too (the
-- caller asked for the key to be gone), but then only the head can be found.
local function main()
  local t = type_of(HEAD)
  if t == 'none' then return {'ok', 0} end
  local ok, s = pcall(read_head)
  if not ok then
    redis.call('DEL', HEAD)
    return {'ok', 1}
  end
  delete_all(s)
  if s.expired then return {'ok', 0} end
  return {'ok', 1}
end

return run(main)
