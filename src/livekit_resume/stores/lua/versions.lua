-- versions: the retained versions, oldest first. One that cannot be read (its record or
-- body evicted, removed or written by hand) is listed all the same, with what its
-- record still says and why it cannot be read: the operator rolls back past it.
-- Reply: {'ok', {{version, epoch, created, size, info, damage}...}} | {'corrupt', message}
--        (damage '' for a version that reads; epoch, created, size, info '' where lost)
local function fields(n)
  if expect_type(vkey(n), 'hash') == 'none' then
    settled()  -- lost, not on a node yet: that fails the script (a slot half moved)
    return {}
  end
  return redis.call('HMGET', vkey(n), 'epoch', 'created', 'size', 'head', 'info')
end

local function listed(n)
  local v = fields(n)
  if not v[1] or not v[2] or not v[3] then
    corrupt('version record ' .. vkey(n) .. ' is missing or incomplete')
  end
  local _, info = read_body(n, v[4], v[5])
  return {n, v[1], v[2], v[3], info, ''}
end

local function main()
  local s = live_head(false)
  local out = {}
  if s == nil then return {'ok', out} end
  for n = s.oldest, s.version do
    local ok, row = pcall(listed, n)
    if not ok then
      if type(row) ~= 'table' or not row.lkresume_corrupt then error(row, 0) end
      local found, v = pcall(fields, n)
      if not found then v = {} end
      row = {n, v[1] or '', v[2] or '', v[3] or '', '', row.lkresume_corrupt}
    end
    out[#out + 1] = row
  end
  return {'ok', out}
end

return run(main)
