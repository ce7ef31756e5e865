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
-- A record lives in one bucket for good: it is written once (rec_insert) where no window
-- has it, then changed in place (rec_update).

local REC_LOAD = 48

local rec_clock = nil
local function rec_now()
  if not rec_clock then
    rec_clock = tonumber(redis.call('TIME')[1])
  end
  return rec_clock
end

-- The bucket hash of a record's field: its first 32 bits.
local function rec_hash(f)
  local a, b, c, d = string.byte(f, 1, 4)
  return ((a * 256 + b) * 256 + c) * 256 + d
end

local function rec_key(base, win, b)
  return base .. ':' .. win.field .. ':' .. string.format('%d', b)
end

local function rec_bucket(win, h)
  local m = 2 ^ win.L
  local b = h % m
  if b < win.s then
    b = h % (2 * m)
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
  local raw = redis.call('HGETALL', base .. ':i')
  local now = rec_now()
  for j = 1, #raw, 2 do
    local W, w = string.match(raw[j], '^(%d+):(%d+)$')
    local L, s, n = string.match(raw[j + 1], '^(%d+),(%d+),(%d+)$')
    if W and L then
      local win = {field = raw[j], W = tonumber(W), w = tonumber(w), L = tonumber(L),
                   s = tonumber(s), n = tonumber(n)}
      win.exp = (win.w + 3) * win.W
      if win.exp <= now then
        redis.call('HDEL', base .. ':i', raw[j])
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
    local v = redis.call('HGET', key, id)
    if v then
      return v, key
    end
  end
  return nil, nil
end

-- Changes a record found by rec_find.
local function rec_update(key, id, value)
  redis.call('HSET', key, id, value)
end

local function rec_save(base, win)
  local idx = base .. ':i'
  redis.call('HSET', idx, win.field, win.L .. ',' .. win.s .. ',' .. win.n)
  local t = redis.call('EXPIRETIME', idx)
  if t < win.exp then
    redis.call('EXPIREAT', idx, win.exp)
  end
end

local rec_expiring = {}

-- Moves the records of bucket s that belong to bucket s + 2^L there.
local function rec_split(base, win)
  local m = 2 ^ win.L
  local from = rec_key(base, win, win.s)
  local to = rec_key(base, win, win.s + m)
  local all = redis.call('HGETALL', from)
  local moved, gone = {}, {}
  for j = 1, #all, 2 do
    if rec_hash(all[j]) % (2 * m) ~= win.s then
      moved[#moved + 1] = all[j]
      moved[#moved + 1] = all[j + 1]
      gone[#gone + 1] = all[j]
    end
  end
  if #gone > 0 then
    redis.call('HSET', to, unpack(moved))
    redis.call('EXPIREAT', to, win.exp)
    redis.call('HDEL', from, unpack(gone))
  end
  rec_expiring[from] = nil
  win.s = win.s + 1
  if win.s == m then
    win.L = win.L + 1
    win.s = 0
  end
end

-- Writes the first record of the order whose field is `id` (not in any window: see
-- rec_find), remembered for `memory` seconds or up to half as long again.
local function rec_insert(base, id, h, value, memory)
  local W = math.max(1, math.floor(tonumber(memory) / 2))
  local field = W .. ':' .. math.floor(rec_now() / W)
  local ix = rec_windows(base)
  local win = ix.by[field]
  if not win then
    win = {field = field, W = W, w = math.floor(rec_now() / W), L = 0, s = 0, n = 0}
    win.exp = (win.w + 3) * W
    ix.by[field] = win
    table.insert(ix.list, 1, win)
    table.sort(ix.list, function(a, b) return a.exp > b.exp end)
  end
  local key = rec_key(base, win, rec_bucket(win, h))
  redis.call('HSET', key, id, value)
  if not rec_expiring[key] then
    redis.call('EXPIREAT', key, win.exp, 'NX')
    rec_expiring[key] = true
  end
  win.n = win.n + 1
  while win.n > REC_LOAD * (2 ^ win.L + win.s) do
    rec_split(base, win)
  end
  rec_save(base, win)
end
