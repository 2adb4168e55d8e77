-- compact: move the latest version onto a new log generation holding its folded items.
-- Runs after a commit; does nothing if the head moved since (another commit, another
-- compaction), so it can never replace newer records.
-- ARGV[4] version, [5] gen the version was folded from, [6] its commit id,
-- [7] records in the elements, [8..] packed elements (batches of records, or staged:
-- see staged_keys).
-- Reply: {'ok', gen, log_len} | {'skip'} | {'corrupt', message}
local function main()
  local version = tonumber(ARGV[4])
  local s = live_head(false)
  if s == nil or s.version ~= version or s.gen ~= tonumber(ARGV[5]) then
    return {'skip'}
  end
  local vk = vkey(version)
  local gen = s.gen + 1
  local lk = logkey(gen)
  if type_of(vk) ~= 'hash' then corrupt('version record ' .. vk .. ' is missing') end
  -- The very commit that was folded, not a same-numbered one of a re-created session.
  if redis.call('HGET', vk, 'cid') ~= ARGV[6] then return {'skip'} end
  if type_of(lk) ~= 'none' then corrupt('key ' .. lk .. ' exists before its generation') end
  local staged = staged_keys(8, #ARGV)
  if staged == nil then return {'skip'} end
  assert_whole(s)  -- the generations the trim deletes are here, or lost
  may_write()
  local len = 0
  if #ARGV >= 8 then len = push_all(lk, 8, #ARGV, staged) end
  redis.call('HSET', vk, 'gen', gen, 'end', len, 'records', tonumber(ARGV[7]))
  s.gen = gen
  trim(s, s.version - s.oldest + 1)
  write_head(s)
  refresh_ttl(s)
  return {'ok', gen, len}
end

return run(main)
