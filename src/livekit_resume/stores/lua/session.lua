-- Prelude of every session script, after clock.lua (Redis has no include: the store
-- prepends both).
--
-- KEYS[1] is the session's head key, "<ns>:{<key>}:head". Every other key of the
-- session shares its prefix, hence its hash tag and its Cluster slot, so scripts derive
-- them here instead of declaring them: a version record "<prefix>v:<n>", its body
-- "<prefix>v:<n>:b" and a log generation "<prefix>log:<gen>". Redis Cluster accepts
-- undeclared keys of the declared key's slot.
--
-- A version record is a hash of short fields (epoch, created, gen, end, size, cid,
-- records), which Redis keeps as a listpack: no value over hash-max-listpack-value (64
-- bytes). Its head bytes and info, longer, are its body: the string bkey(n), the head's
-- length in decimal, ':', the head, then the info. A hash with one value over 64 bytes
-- becomes a hashtable, twice the memory. Records of earlier releases hold head and info
-- as fields of the hash and have no body key: read_body reads either.
--
-- Common arguments: ARGV[1] now (see clock.lua), ARGV[2] the session TTL in seconds and
-- ARGV[3] in milliseconds ('' = sessions never expire).
--
-- Head hash fields: epoch (fencing counter, survives release), owner and expires (the
-- lease; absent when free), touched (last acquire, renew or commit), version (latest,
-- 0 = none), oldest (oldest retained version), gen (log generation commits append to),
-- gen_lo (oldest log generation that may still exist). Times are seconds, written
-- with fmt().
--
-- Nothing is written before every check has passed: a script that stops half-way
-- leaves no half-written snapshot.

local HEAD = KEYS[1]
local PREFIX = string.sub(HEAD, 1, -5)

local function vkey(n) return PREFIX .. 'v:' .. n end
local function logkey(g) return PREFIX .. 'log:' .. g end
local function bkey(n) return PREFIX .. 'v:' .. n .. ':b' end

-- Foreign data at one of our key names is reported, never overwritten.
local function corrupt(msg) error({lkresume_corrupt = msg}) end

local function type_of(k)
  local t = redis.call('TYPE', k)
  if type(t) == 'table' then t = t.ok end
  return t
end

local function expect_type(k, want)
  local t = type_of(k)
  if t ~= 'none' and t ~= want then
    corrupt('key ' .. k .. ' holds a ' .. t .. ', not a ' .. want)
  end
  return t
end

local TTL = tonumber(ARGV[2])
local TTL_MS = ARGV[3]

local HEAD_NUMBERS = {'epoch', 'version', 'oldest', 'gen', 'gen_lo', 'touched'}

-- Lua's tonumber() also reads 'inf', 'nan', '1e12', '-5' and '1.5', which no store
-- writes: a head holding one (by hand, foreign data, damage) is corrupt, found before
-- any loop runs over its versions or generations. Such a loop would never end, or take
-- hours, and a script that has written cannot be killed: the server would hang. No
-- session spans more than MAX_SPAN versions (keep) or log generations.
local MAX_SPAN = 1000000
local function finite(x) return x == x and x ~= math.huge and x ~= -math.huge end
local function counter(x) return x >= 0 and x < 2 ^ 53 and math.floor(x) == x end

-- The session's head as a table, or nil when there is none. A head past its TTL (by
-- the same clock as `touched`) comes back with expired = true: PEXPIRE removes it on
-- the server's clock, this check covers an injected clock and the last millisecond.
-- Foreign data at the head fails HGETALL with WRONGTYPE (reported as corrupt by the
-- client); Redis keeps no empty hash, so nothing read means no head.
local function read_head()
  local raw = redis.call('HGETALL', HEAD)
  if #raw == 0 then return nil end
  local h = {}
  for i = 1, #raw, 2 do h[raw[i]] = raw[i + 1] end
  local s = {owner = h.owner, expires = tonumber(h.expires)}
  for _, f in ipairs(HEAD_NUMBERS) do
    s[f] = tonumber(h[f])
    if s[f] == nil or not finite(s[f]) or (f ~= 'touched' and not counter(s[f])) then
      corrupt('session head ' .. HEAD .. ' has no valid ' .. f .. ' (' .. tostring(h[f]) .. ')')
    end
  end
  if h.expires ~= nil and (s.expires == nil or not finite(s.expires)) then
    corrupt('session head ' .. HEAD .. ' has no valid expires (' .. h.expires .. ')')
  end
  if s.oldest < 1 or s.oldest > s.version + 1 or s.version - s.oldest >= MAX_SPAN
      or s.gen_lo > s.gen or s.gen - s.gen_lo > MAX_SPAN then
    corrupt('session head ' .. HEAD .. ' is inconsistent: versions ' .. h.oldest .. '..' ..
      h.version .. ', log generations ' .. h.gen_lo .. '..' .. h.gen)
  end
  -- never while another owner's lease runs: a worker configured with a shorter TTL
  -- would purge a conversation its holder is saving
  if TTL and s.touched + TTL <= NOW and not (s.owner and s.expires and s.expires > NOW) then
    s.expired = true
  end
  return s
end

local function new_head()
  -- epochs start from the clock in microseconds (see log.epoch_floor): a session created
  -- again after a delete or an expiry never reissues an epoch of its former life
  return {epoch = math.floor(NOW * 1000000), version = 0, oldest = 1, gen = 0, gen_lo = 0,
          touched = NOW}
end

local function write_head(s)
  redis.call('HSET', HEAD, 'epoch', fmt(s.epoch), 'version', s.version, 'oldest', s.oldest,
    'gen', s.gen, 'gen_lo', s.gen_lo, 'touched', fmt(s.touched))
end

-- Every key of the session: the head, each retained version and its body, each log
-- generation. (A version of an earlier release has no body: a DEL, PEXPIRE or PERSIST of
-- it does nothing.)
local function session_keys(s)
  local ks = {HEAD}
  for n = s.oldest, s.version do
    ks[#ks + 1] = vkey(n)
    ks[#ks + 1] = bkey(n)
  end
  for g = s.gen_lo, s.gen do ks[#ks + 1] = logkey(g) end
  return ks
end

-- Every key is looked at before the first DEL: on a Cluster whose slot is half moved
-- (resharding), a key already on the other node fails the script there, having deleted
-- nothing, rather than midway with the head and versions gone.
local function delete_all(s)
  local ks = session_keys(s)
  for _, k in ipairs(ks) do redis.call('TYPE', k) end
  for _, k in ipairs(ks) do redis.call('DEL', k) end
end

-- A key of the session not found here is lost (evicted, removed by hand) only where the
-- session's slot is settled on this node. On a Cluster slot half moved (Redis moves a
-- slot's keys one by one), a script ASKed to the importing node finds a key still on the
-- old node absent (TYPE answers 'none'), where the old node fails the script with ASK
-- for one already moved: a trim, a DEL or a PEXPIRE would miss it, leaving versions no
-- head names or keys that expire under a renewed head. settled() asks: a multi-key
-- EXISTS of the head and a key nobody writes, which a node whose slot is migrating or
-- importing refuses (TRYAGAIN). Called before a script's first write, it fails the
-- script having written nothing (the client reports the store unavailable, the caller
-- retries once the slot has moved); passed, it holds to the script's end (a script runs
-- whole), so what is not found is lost.
local SETTLED = false
local function settled()
  if not SETTLED then
    redis.call('EXISTS', HEAD, PREFIX .. 'settled')
    SETTLED = true
  end
end

-- Every key of the session that holds data is on this node, or lost: checked before
-- the first write of a script that touches more than the head, the latest version and
-- the log it appends to (those are checked as they are read).
local function assert_version_here(n)
  local vk = vkey(n)
  local t = type_of(vk)
  -- its body, unless the record is of an earlier release (head and info in the hash);
  -- foreign data at the record is left to the scripts that read it
  if t == 'none' or (t == 'hash' and type_of(bkey(n)) == 'none'
      and not redis.call('HMGET', vk, 'head')[1]) then
    settled()
  end
end

local function assert_whole(s)
  for n = s.oldest, s.version do assert_version_here(n) end
  for g = s.gen_lo, s.gen do
    if type_of(logkey(g)) == 'none' then
      -- an empty generation has no key: only one a retained version reads must be here
      for n = s.oldest, s.version do
        local v = redis.call('HMGET', vkey(n), 'gen', 'end')
        if tonumber(v[1]) == g and (tonumber(v[2]) or 0) > 0 then settled() end
      end
    end
  end
end

-- What a commit of `version` trims (see trim) is on this node, or lost: the versions it
-- deletes, and the log generations, each looked at only if one is absent (assert_whole).
-- One TYPE a commit as a rule, where assert_whole looks at every key.
local function assert_trim_here(s, version, keep)
  local oldest = math.max(s.oldest, version - keep + 1)
  for n = s.oldest, oldest - 1 do assert_version_here(n) end
  if s.gen_lo < s.gen then
    local live = s.gen
    if oldest <= s.version then
      live = tonumber(redis.call('HGET', vkey(oldest), 'gen'))
      if live == nil or not counter(live) or live < s.gen_lo or live > s.gen then
        live = s.gen_lo  -- trim deletes none on its word
      end
    end
    for g = s.gen_lo, live - 1 do
      if type_of(logkey(g)) == 'none' then return assert_whole(s) end
    end
  end
end

-- A script is never undone, so a command refused after its first write (an ACL user
-- short of one) would leave that write: a commit's version without its trim, an
-- acquisition's owner reported as failed. The commands the writes are followed by
-- (trim's DEL, refresh_ttl's PTTL and PEXPIRE or PERSIST) are asked for first, on a
-- key of the slot, without running them: running one, even where it changes nothing,
-- would let the script past maxmemory (Redis lets a script that has written go on).
-- Redis 6 has no acl_check_cmd: there a refusal comes as the command does.
local function may_write()
  if not redis.acl_check_cmd then return end
  local k = PREFIX .. 'settled'
  local wanted = {{'DEL', k}, {'PTTL', k}, {'PERSIST', k}}
  if TTL_MS ~= '' then wanted[3] = {'PEXPIRE', k, TTL_MS} end
  for _, call in ipairs(wanted) do
    if not redis.acl_check_cmd(unpack(call)) then
      error({err = 'NOPERM this user can\'t run this command: ' .. call[1]
        .. ', which the store\'s scripts run after they write; nothing was written'})
    end
  end
end

-- Where every script starts: the session's live head, or nil, and whether the head found
-- had expired. An expired head counts as no session at all. Scripts that write pass
-- purge = true, which deletes the expired session's keys first, so that what they write
-- next starts afresh; read-only scripts leave them to PEXPIRE and write nothing.
local function live_head(purge)
  if purge then may_write() end
  local s = read_head()
  if s and s.expired then
    if purge then delete_all(s) end
    return nil, true
  end
  if s and purge and TTL_MS ~= '' then
    -- refresh_ttl touches every key of the session after the script's writes. A key of
    -- the slot that never exists is looked at first: on a slot half moved (resharding)
    -- it is not local, and the script fails here, having written nothing, rather than
    -- with the head written and the rest not (a takeover reported as failed that had
    -- fenced the holder).
    redis.call('TYPE', vkey(s.version + 1))  -- TYPE: a command the minimal ACL grants
    assert_whole(s)  -- every key's deadline moves: each must be here
  end
  return s, false
end

-- Whole sessions expire together: every write moves the deadline of every key.
local function refresh_ttl(s)
  if TTL_MS ~= '' then
    for _, k in ipairs(session_keys(s)) do redis.call('PEXPIRE', k, TTL_MS) end
  elseif redis.call('PTTL', HEAD) >= 0 then
    for _, k in ipairs(session_keys(s)) do redis.call('PERSIST', k) end
  end
end

-- Drop versions beyond `keep`, then log generations no retained version reads.
-- Versions only ever move to newer generations, so the live ones are a suffix.
local function trim(s, keep)
  local oldest = math.max(s.oldest, s.version - keep + 1)
  for n = s.oldest, oldest - 1 do redis.call('DEL', vkey(n), bkey(n)) end
  s.oldest = oldest
  local live = s.gen
  if s.gen_lo < s.gen and s.version >= s.oldest then  -- else no generation can go
    live = tonumber(redis.call('HGET', vkey(s.oldest), 'gen'))
    -- Trimming runs after the script has written, so a version record that names no
    -- generation of the head's (missing, or a hostile 1e12 that would loop for hours)
    -- deletes none: nothing that a retained version may read goes on its word.
    if live == nil or not finite(live) or not counter(live) or live < s.gen_lo
        or live > s.gen then
      live = s.gen_lo
    end
  end
  for g = s.gen_lo, live - 1 do redis.call('DEL', logkey(g)) end
  s.gen_lo = live
end

-- The keys a session created now would write first (its first log generation, version
-- and version body). One of them existing while the head does not means the session
-- lost its head (evicted, or deleted by hand) and these are its remains: a new session
-- must not append to them. Returns the first found, or nil. O(1); the client scans for the rest.
local function first_remain()
  for _, k in ipairs({logkey(0), vkey(1), bkey(1)}) do
    if type_of(k) ~= 'none' then return k end
  end
  return nil
end

-- The log generation a commit appends to must hold exactly what the latest version
-- read, nothing more (records of a former life, another writer) or less (an evicted
-- or truncated list): otherwise the new version would read data it never wrote.
-- Returns the records the log holds (a version written before batches held one record
-- per element, so its 'end' counts them). Foreign data at the version or the log fails
-- HMGET or LLEN with WRONGTYPE, before anything is written.
local function check_log(s, lk)
  local want, records = 0, 0
  if s.version >= s.oldest then
    local vk = vkey(s.version)
    local v = redis.call('HMGET', vk, 'gen', 'end', 'records')
    if tonumber(v[1]) ~= s.gen or tonumber(v[2]) == nil then
      corrupt('version record ' .. vk .. ' is missing or incomplete')
    end
    want = tonumber(v[2])
    records = tonumber(v[3]) or want
  end
  local have = redis.call('LLEN', lk)
  if have ~= want then
    corrupt('log ' .. lk .. ' holds ' .. have .. ' records where version ' .. s.version ..
      ' left ' .. want)
  end
  return records
end

-- Version n's head bytes and info: `head` and `info` as read from its hash (HMGET),
-- both there in a record of an earlier release, neither in one written since, whose
-- body key holds them (see the top of this file). A body missing, or not of that form,
-- is a corrupt record.
local function read_body(n, head, info)
  if head and info then return head, info end
  local vk = vkey(n)
  local bk = bkey(n)
  if not head and not info then
    expect_type(bk, 'string')
    local body = redis.call('GET', bk)
    local digits = body and string.match(body, '^(%d+):')
    local size = digits and tonumber(digits)
    -- an info is never empty (msgpack of a map): a body without one was cut
    if size and #digits + 1 + size < #body then
      local from = #digits + 2
      return string.sub(body, from, from + size - 1), string.sub(body, from + size)
    end
  end
  settled()
  corrupt('version record ' .. vk .. ' is missing or incomplete (its head and info, ' ..
    bk .. ')')
end

-- Writes version n's body: a new record's head bytes and info. A user whose ACL
-- predates GET and SET (docs/security.md) may not SET: the record is then written as
-- earlier releases wrote it, head and info in its hash, which every reader reads. Runs
-- after the script's first write: any refusal takes that way, never leaves the record
-- without its head.
local function write_body(n, head, info)
  local done = redis.pcall('SET', bkey(n), #head .. ':' .. head .. info)
  if type(done) == 'table' and done.err then
    redis.call('HSET', vkey(n), 'head', head, 'info', info)
  end
end

-- Elements too large to send in one command come staged: the client wrote each to a
-- key of its own beforehand, and the argument is '@<bytes>:<key>' ('@' never starts a
-- log element). The staged keys by argument index, or nil when one is missing or not
-- whole (expired, evicted): checked before anything is written.
local function staged_keys(from, to)
  local staged = {}
  for i = from, to do
    if string.byte(ARGV[i], 1) == 64 then
      local size, sk = string.match(ARGV[i], '^@(%d+):(.+)$')
      if sk == nil or expect_type(sk, 'string') == 'none'
          or redis.call('STRLEN', sk) ~= tonumber(size) then
        return nil
      end
      staged[i] = sk
    end
  end
  return staged
end

-- RPUSH in slices (unpack() of thousands of values overflows Lua's C stack); a staged
-- element is moved from its key into the list.
local function push_all(k, from, to, staged)
  local len = 0
  local i = from
  while i <= to do
    if staged[i] then
      len = redis.call('RPUSH', k, redis.call('GET', staged[i]))
      redis.call('DEL', staged[i])
      i = i + 1
    else
      local j = i
      while j < to and j < i + 999 and not staged[j + 1] do j = j + 1 end
      len = redis.call('RPUSH', k, unpack(ARGV, i, j))
      i = j + 1
    end
  end
  return len
end

-- Runs the script's main() and turns a `corrupt` into a {'corrupt', message} reply.
-- Any other error is raised again with its code kept: pcall hands a Redis error over as
-- a string ("READONLY …", "OOM …"), which error({err = …}) replies as-is, where a bare
-- error(string) would turn it into "ERR …".
local function run(main)
  local ok, res = pcall(main)
  if ok then return res end
  if type(res) == 'table' and res.lkresume_corrupt then
    return {'corrupt', res.lkresume_corrupt}
  end
  if type(res) == 'string' then error({err = res}) end
  error(res, 0)
end
