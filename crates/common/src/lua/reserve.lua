-- Pre-deducts stock for a run of orders, each one all items or none and at most once per
-- order id. Orders are decided one after the other, exactly as if each had its own call:
-- one call per run of orders only saves the per-call cost.
--
-- KEYS[1]     the "loaded" marker: absent means Redis lost its data and was not rebuilt;
--             its value is the Redis generation (advanced by every rebuild)
-- KEYS[2]     the stock epoch counter (see below)
-- KEYS[3]     the sequence counter that names pre-deductions
-- then, for each order: the base of its record (lua/record.lua), then stock:{product_id}
--             of each item in item order,
--             then stockpipe:buyers:{product_id} of each item (the product's limit and its
--             customers' held units; absent: no limit)
-- ARGV[1]     record memory in seconds (lua/record.lua)
-- ARGV[2]     the epoch the caller's sold-out marker was learnt in, or ""
-- ARGV[3]     on a cluster, the hash slot of these keys (tokens: see token_seq), or ""
-- then, for each order:
--   id        the order's record field (lua/record.lua)
--   n         number of items
--   items     the order's items in canonical form "42:2,7:1"
--   forced    a decision taken without looking at stock ("X|invalid_order|"), or ""
--   sold_out  "1": the first item's product was at 0 in ARGV[2]'s epoch; if the epoch is
--             still that one, refuse for it without reading stock (otherwise the marker
--             went stale and stock decides); "" otherwise
--   customer  the order's customer_id, or ""
--   n quantities, then n product ids
--
-- The rule of a decision (DESIGN.md "Per-customer limits"; the consumer applies the same):
-- an order without a customer that has an item of a limited product is invalid; then item
-- by item the first that fails decides: unknown product, stock short, the customer's held
-- units plus the quantity above the product's limit. A reservation takes every item's
-- stock and adds the quantity to the customer's units of each limited product.
--
-- The epoch is "<loaded marker>#<counter>". Everything that can add stock to a key outside
-- this script (restore, adjust, a load or rebuild, a repair) changes it in the same atomic
-- step, so "product p was at 0 during epoch E, and the epoch is still E" means p is still
-- at 0: no script here ever adds stock.
--
-- Returns {'unloaded'} (nothing done), or
-- {'ok', epoch, k, zero_1 .. zero_k, kind_1, rec_1, kind_2, rec_2, ...}: zero_i are
-- products seen at 0 stock by this call; per order kind is 'new' (decided now), 'seen'
-- (decided before; rec is the first decision, nothing changed) or 'corrupt' (rec names a
-- stock key, or the buyers hash whose count of the order's customer, that does not hold an
-- integer; nothing done for this order). Records:
-- 'R|<token>|<items>[|<customer>]' stock held, 'C|<token>|<items>[|<customer>]' held then
-- given back,
-- 'X|<reason>|<product_id>' refused. A token '<generation>.<sequence>' names one
-- pre-deduction, so that PostgreSQL can tell a redelivery of it from a second one.
--
-- Each order is decided reading only; then its record is claimed (lua/record.lua
-- rec_claim), and only an order claimed now takes stock. A stock value read once is kept
-- for the rest of the call (its own DECRBY keeps it true: no script adds stock).
--
-- A stock value is an integer only as lua/integer.lua reads it; tokens: lua/token.lua;
-- limits: lua/buyers.lua.
local marker = redis.call('GET', KEYS[1])
if not marker then
  return {'unloaded'}
end
local _, named = marker_gens(marker)
local epoch = marker .. '#' .. (redis.call('GET', KEYS[2]) or '0')
local ttl = ARGV[1]
local marker_valid = ARGV[2] ~= '' and ARGV[2] == epoch
local zeros = {}
local zero_seen = {}
local function zero(pid)
  if not zero_seen[pid] then
    zero_seen[pid] = true
    zeros[#zeros + 1] = pid
  end
end
-- Stock values this call has read or written: key -> units (its own DECRBY keeps them).
local stock = {}
-- The call's stock keys and buyers hashes are read up front, each once: one MGET of the
-- stock keys and one EXISTS of the buyers hashes (in runs of 1,000), instead of a GET and
-- an EXISTS per product, the most frequent calls of the script. fetched[key] is the raw
-- value, or false (no such key, or not a string).
local fetched = {}
-- The one home of an order's layout in KEYS and ARGV (the header): from an order's first
-- key k and argument a, its item count and the next order's first key and argument.
local function order_at(k, a)
  local n = tonumber(ARGV[a + 1])
  return n, k + 1 + 2 * n, a + 6 + 2 * n
end
do
  local stock_keys, buyers_keys, seen = {}, {}, {}
  local k, a = 4, 4
  while a <= #ARGV do
    local n, next_k, next_a = order_at(k, a)
    for i = 1, n do
      local sk, bk = KEYS[k + i], KEYS[k + n + i]
      if not seen[sk] then
        seen[sk] = true
        stock_keys[#stock_keys + 1] = sk
      end
      if not seen[bk] then
        seen[bk] = true
        buyers_keys[#buyers_keys + 1] = bk
      end
    end
    k, a = next_k, next_a
  end
  for from = 1, #stock_keys, 1000 do
    local to = math.min(from + 999, #stock_keys)
    local values = redis.call('MGET', unpack(stock_keys, from, to))
    for j = from, to do
      fetched[stock_keys[j]] = values[j - from + 1]
    end
  end
  buyers_prefetch(buyers_keys)
end
local out = {}
local k = 4
local a = 4
while a <= #ARGV do
  local id = ARGV[a]
  local n, next_k, next_a = order_at(k, a)
  local items = ARGV[a + 2]
  local decision = ARGV[a + 3]
  local guarded = ARGV[a + 4] == '1'
  local customer = ARGV[a + 5]
  local qty = a + 5
  local pid = a + 5 + n
  local base = KEYS[k]
  local buyers = k + n
  local h = rec_hash(id)
  -- First the decision, reading only; then the record is claimed (HSETNX), and only an
  -- order claimed now takes stock: a decision made before stands as it is.
  local corrupt = nil
  local limited = {}
  local take = false
  if decision == '' and customer == '' and any_limited(buyers, n) then
    decision = 'X|invalid_order|'
  end
  if decision == '' and guarded and marker_valid then
    decision = 'X|insufficient_stock|' .. ARGV[pid + 1]
  end
  if decision == '' then
    for i = 1, n do
      local key = KEYS[k + i]
      local have = stock[key]
      if not have then
        local raw = fetched[key]
        if not raw then
          -- Absent, or not a string (MGET answers nil for both): GET tells them apart,
          -- and refuses a key of another type as it always did.
          raw = redis.call('GET', key)
        end
        if not raw then
          decision = 'X|unknown_product|' .. ARGV[pid + i]
          break
        end
        have = integer(raw)
        if not have then
          corrupt = key
          break
        end
        stock[key] = have
      end
      local q = tonumber(ARGV[qty + i])
      if have < q then
        if have == 0 then
          zero(ARGV[pid + i])
        end
        decision = 'X|insufficient_stock|' .. ARGV[pid + i]
        break
      end
      local limit = limit_check(KEYS[buyers + i], customer, q)
      if limit == 'over' then
        decision = 'X|limit_exceeded|' .. ARGV[pid + i]
        break
      end
      if limit == 'corrupt' then
        corrupt = KEYS[buyers + i]
        break
      end
      limited[i] = limit == 'counts'
    end
    if decision == '' and not corrupt then
      take = true
      decision = 'R|' .. new_token(named, KEYS[3], ARGV[3]) .. '|' .. items
      if customer ~= '' then
        decision = decision .. '|' .. customer
      end
    end
  end
  local kind = 'new'
  if corrupt then
    -- Nothing is done for this order, unless it was decided before.
    local rec = rec_find(base, id, h)
    if rec then
      kind = 'seen'
      decision = rec
    else
      kind = 'corrupt'
      decision = corrupt
    end
  else
    local rec = rec_claim(base, id, h, decision, ttl)
    if rec then
      kind = 'seen'
      decision = rec
    elseif take then
      for i = 1, n do
        local key = KEYS[k + i]
        local left = redis.call('DECRBY', key, ARGV[qty + i])
        stock[key] = left
        if left == 0 then
          zero(ARGV[pid + i])
        end
        if limited[i] then
          redis.call('HINCRBY', KEYS[buyers + i], customer, ARGV[qty + i])
        end
      end
    end
  end
  out[#out + 1] = kind
  out[#out + 1] = decision
  k, a = next_k, next_a
end
rec_flush()
local reply = {'ok', epoch, tostring(#zeros)}
for _, z in ipairs(zeros) do
  reply[#reply + 1] = z
end
for _, v in ipairs(out) do
  reply[#reply + 1] = v
end
return reply
