-- Prepended to the scripts that read or write order records: the one home of their layout
-- (DESIGN.md "Order records in buckets").
--
-- The records under a base ('stockpipe:rec' on one Redis, 'stockpipe:rec:{o<tag>}' in one
-- slot of a cluster) are fields of small hashes. A record's field is the first 12 bytes of
-- the SHA-256 of its order id (`record_field` in redis_store.rs): 96 bits, whatever the
-- id's length, and no id can be made to land on another's:
--   <base>:i             the index: field '<W>:<w>' -> '<L>,<s>,<n>' for each live window
--   <base>:<W>:<w>:<b>   bucket b of window w of length W: the records of a memory of 2W
--                        seconds written during [w W, (w + 1) W) (Redis time)
-- Every key of a window expires at (w + 3) W, all at once: a record is remembered for 2W to
-- 3W. A window's buckets split one at a time as it fills (linear hashing on the field's
-- first 32 bits; <L> level, <s> next bucket to split, <n> records), so a bucket
-- holds about REC_LOAD records, stays a listpack (hash-max-listpack-entries 128), and a
-- record costs its id and value plus a few bytes, at any rate.
--
-- A record lives in one bucket for good: it is written once (rec_insert, or rec_claim,
-- which looks for it and writes it in one go) where no window has it, then changed in
-- place (rec_update).
--
-- Every bucket key carries its window's expiry from its creation, with no per-insert cost:
-- bucket 0 is created by a window's first record, every other by the split that opens it
-- (with the empty field '' if no record moves there).

local REC_LOAD = 48

local rec_clock = nil
local function rec_now()
  if not rec_clock then
    rec_clock = tonumber(call('TIME')[1])
  end
  return rec_clock
end

-- The bucket hash of a record's field: its first 32 bits.
local function rec_hash(f)
  local a, b, c, d = byte(f, 1, 4)
  return ((a * 256 + b) * 256 + c) * 256 + d
end

-- The key of bucket b of a window (its names are kept: a call meets the same buckets
-- again; '%d' is an integer conversion, where `..` of a number is a floating-point printf).
local function rec_key(base, win, b)
  local k = win.keys[b]
  if not k then
    k = win.prefix .. format('%d', b)
    win.keys[b] = k
  end
  return k
end

-- m is 2^L, kept along with L.
local function rec_window(base, field, W, w, L, s, n)
  return {field = field, prefix = base .. ':' .. field .. ':', W = W, w = w, L = L, m = 2 ^ L,
          s = s, n = n, exp = (w + 3) * W, keys = {}}
end

local function rec_bucket(win, h)
  local b = h % win.m
  if b < win.s then
    b = h % (2 * win.m)
  end
  return b
end

-- The live windows of `base`, newest first, read once per call.
local rec_index = {}
local function rec_windows(base)
  local ix = rec_index[base]
  if ix then
    return ix
  end
  ix = {list = {}, by = {}}
  local raw = call('HGETALL', base .. ':i')
  local now = rec_now()
  for j = 1, #raw, 2 do
    local W, w = string.match(raw[j], '^(%d+):(%d+)$')
    local L, s, n = string.match(raw[j + 1], '^(%d+),(%d+),(%d+)$')
    if W and L then
      local win = rec_window(base, raw[j], tonumber(W), tonumber(w), tonumber(L),
                             tonumber(s), tonumber(n))
      if win.exp <= now then
        call('HDEL', base .. ':i', raw[j])
      else
        ix.by[raw[j]] = win
        ix.list[#ix.list + 1] = win
      end
    end
  end
  table.sort(ix.list, function(a, b) return a.exp > b.exp end)
  rec_index[base] = ix
  return ix
end

-- The record of the order whose field is `id` (h = rec_hash(id)) under `base`: its value
-- and the key of its bucket, or nil.
local function rec_find(base, id, h)
  for _, win in ipairs(rec_windows(base).list) do
    local key = rec_key(base, win, rec_bucket(win, h))
    local v = call('HGET', key, id)
    if v then
      return v, key
    end
  end
  return nil, nil
end

-- Changes a record found by rec_find.
local function rec_update(key, id, value)
  call('HSET', key, id, value)
end

-- Windows whose count changed since saved: window -> base.
local rec_unsaved = {}

-- Saves a window's state in the index; a new window makes the index live as long as it.
local function rec_save(base, win)
  rec_unsaved[win] = nil
  local idx = base .. ':i'
  call('HSET', idx, win.field, win.L .. ',' .. win.s .. ',' .. win.n)
  if win.new then
    win.new = nil
    local t = call('EXPIRETIME', idx)
    if t < win.exp then
      call('EXPIREAT', idx, win.exp)
    end
  end
end

-- Moves the records of bucket s that belong to bucket s + 2^L there: one HSET of them
-- all, one HDEL of them all.
local function rec_split(base, win)
  local m = win.m
  local from = rec_key(base, win, win.s)
  local to = rec_key(base, win, win.s + m)
  local all = call('HGETALL', from)
  local moved, fields = {}, {}
  for j = 1, #all, 2 do
    local f = all[j]
    if f ~= '' and rec_hash(f) % (2 * m) ~= win.s then
      moved[#moved + 1] = f
      moved[#moved + 1] = all[j + 1]
      fields[#fields + 1] = f
    end
  end
  -- An empty bucket would be deleted and created again by an insert without an expiry: it
  -- keeps the empty field instead (no record's field is empty).
  if #fields == 0 then
    moved = {'', ''}
  elseif #fields * 2 == #all then
    call('HSET', from, '', '')
  end
  call('HSET', to, unpack(moved))
  call('EXPIREAT', to, win.exp)
  if #fields > 0 then
    call('HDEL', from, unpack(fields))
  end
  win.s = win.s + 1
  if win.s == m then
    win.L = win.L + 1
    win.m = 2 * m
    win.s = 0
  end
end

-- The window new records of `memory` seconds go to now, created if need be.
local rec_target = {}
local function rec_target_window(base, memory)
  local by_memory = rec_target[base]
  if not by_memory then
    by_memory = {}
    rec_target[base] = by_memory
  end
  local win = by_memory[memory]
  if win then
    return win
  end
  local W = math.max(1, math.floor(tonumber(memory) / 2))
  local w = math.floor(rec_now() / W)
  local field = W .. ':' .. w
  local ix = rec_windows(base)
  win = ix.by[field]
  if not win then
    win = rec_window(base, field, W, w, 0, 0, 0)
    win.new = true
    ix.by[field] = win
    table.insert(ix.list, 1, win)
    table.sort(ix.list, function(a, b) return a.exp > b.exp end)
  end
  by_memory[memory] = win
  return win
end

-- Counts a record just written to bucket `key` of `win`, and splits what is due.
local function rec_added(base, win, key)
  win.n = win.n + 1
  if win.new then
    call('EXPIREAT', key, win.exp)
    rec_save(base, win)
  end
  if win.n > REC_LOAD * (win.m + win.s) then
    repeat
      rec_split(base, win)
    until win.n <= REC_LOAD * (win.m + win.s)
    rec_save(base, win)
  else
    rec_unsaved[win] = base
  end
end

-- Writes the first record of the order whose field is `id` (not in any window: see
-- rec_find), remembered for `memory` seconds or up to half as long again.
local function rec_insert(base, id, h, value, memory)
  local win = rec_target_window(base, memory)
  local key = rec_key(base, win, rec_bucket(win, h))
  call('HSET', key, id, value)
  rec_added(base, win, key)
end

-- rec_find and rec_insert in one: writes `value` as the first record of the order whose
-- field is `id` and returns nil, or returns the record some window already has (nothing
-- written). The window written to is looked up with the write itself (HSETNX).
local function rec_claim(base, id, h, value, memory)
  local win = rec_target_window(base, memory)
  local list = rec_windows(base).list
  for j = 1, #list do
    local other = list[j]
    if other ~= win then
      local v = call('HGET', rec_key(base, other, rec_bucket(other, h)), id)
      if v then
        return v
      end
    end
  end
  local key = rec_key(base, win, rec_bucket(win, h))
  if call('HSETNX', key, id, value) == 0 then
    return call('HGET', key, id)
  end
  rec_added(base, win, key)
  return nil
end

-- Saves the counts of the windows this call inserted into. A script that inserts calls it
-- before it returns; a count left unsaved (an error midway) only delays a split.
local function rec_flush()
  for win, base in pairs(rec_unsaved) do
    rec_save(base, win)
  end
end
