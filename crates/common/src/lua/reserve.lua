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
--   guard     a decision taken without looking at stock ("X|invalid_order|"); or "1": the
--             first item's product was at 0 in ARGV[2]'s epoch, and if the epoch is still
--             that one the order is refused for it without reading stock (otherwise the
--             marker went stale and stock decides); or ""
--   customer  the order's customer_id, or ""
--   n quantities
-- (A product's id is read from its stock key, stock:{<id>}, where a result names it.)
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
-- {'ok', epoch, k, out_1 .. out_n, zero_1 .. zero_k}: zero_i are products seen at 0 stock
-- by this call; out_i is order i's record, decided now, or '~' and its record when it was
-- decided before (the first decision; nothing changed), or '!' and the stock key, or the
-- buyers hash whose count of the order's customer, that does not hold an integer (nothing
-- done for this order). No record begins with '~' or '!'. Records:
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
local marker = call('GET', KEYS[1])
if not marker then
  return {'unloaded'}
end
local _, named = marker_gens(marker)
local epoch = marker .. '#' .. (call('GET', KEYS[2]) or '0')
local ttl = ARGV[1]
local marker_valid = ARGV[2] ~= '' and ARGV[2] == epoch
local zeros = {}
local zero_seen = {}
-- The product id of a stock key: 'stock:{42}' -> '42'.
local function product_of(key)
  return sub(key, 8, -2)
end
-- Notes the product of stock key `key` at 0.
local function zero(key)
  if not zero_seen[key] then
    zero_seen[key] = true
    zeros[#zeros + 1] = product_of(key)
  end
end
-- The refusal for too little stock of the product of `key`, made once per call (in a sale
-- that ran out, most orders get it).
local short = {}
local function insufficient(key)
  local d = short[key]
  if not d then
    d = 'X|insufficient_stock|' .. product_of(key)
    short[key] = d
  end
  return d
end
-- Stock values this call has read or written: key -> units (its own DECRBY keeps them).
local stock = {}
-- The call's stock keys and buyers hashes are read up front, each once: one MGET of the
-- stock keys and one EXISTS of the buyers hashes (in runs of 1,000), instead of a GET and
-- an EXISTS per product, the most frequent calls of the script. fetched[key] is the raw
-- value, or false (no such key, or not a string).
local fetched = {}
local nargv = #ARGV
-- The one home of an order's layout in KEYS and ARGV (the header): from an order's first
-- key k and argument a, its item count and the next order's first key and argument.
local function order_at(k, a)
  local n = num(ARGV[a + 1])
  return n, k + 1 + 2 * n, a + 5 + n
end
do
  local stock_keys, buyers_keys, seen = {}, {}, {}
  local k, a = 4, 4
  while a <= nargv do
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
    local values = call('MGET', unpack(stock_keys, from, to))
    for j = from, to do
      fetched[stock_keys[j]] = values[j - from + 1]
    end
  end
  buyers_prefetch(buyers_keys)
end
-- The reply, one entry per order after the first three; the count of zeros is set last.
local out = {'ok', epoch, ''}
local o = 3
-- Which items of the order being decided count against a limit (written for each item
-- before it is read; one table for the whole call).
local limited = {}
local k = 4
local a = 4
while a <= nargv do
  local id = ARGV[a]
  local n, next_k, next_a = order_at(k, a)
  local items = ARGV[a + 2]
  local decision = ARGV[a + 3]
  local guarded = decision == '1'
  if guarded then
    decision = ''
  end
  local customer = ARGV[a + 4]
  local qty = a + 4
  local base = KEYS[k]
  local buyers = k + n
  local h = rec_hash(id)
  -- First the decision, reading only; then the record is claimed (HSETNX), and only an
  -- order claimed now takes stock: a decision made before stands as it is.
  local corrupt = nil
  local take = false
  if decision == '' and customer == '' and any_limited(buyers, n) then
    decision = 'X|invalid_order|'
  end
  if decision == '' and guarded and marker_valid then
    decision = insufficient(KEYS[k + 1])
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
          raw = call('GET', key)
        end
        if not raw then
          decision = 'X|unknown_product|' .. product_of(key)
          break
        end
        have = integer(raw)
        if not have then
          corrupt = key
          break
        end
        stock[key] = have
      end
      local q = num(ARGV[qty + i])
      if have < q then
        if have == 0 then
          zero(key)
        end
        decision = insufficient(key)
        break
      end
      local bk = KEYS[buyers + i]
      local limit = limit_check(bk, customer, q)
      if limit == 'over' then
        decision = 'X|limit_exceeded|' .. product_of(key)
        break
      end
      if limit == 'corrupt' then
        corrupt = bk
        break
      end
      limited[i] = limit == 'counts'
    end
    if decision == '' and not corrupt then
      take = true
      decision = token_record('R', named, KEYS[3], ARGV[3], items, customer)
    end
  end
  if corrupt then
    -- Nothing is done for this order, unless it was decided before.
    local rec = rec_find(base, id, h)
    if rec then
      decision = '~' .. rec
    else
      decision = '!' .. corrupt
    end
  else
    local rec = rec_claim(base, id, h, decision, ttl)
    if rec then
      decision = '~' .. rec
    elseif take then
      for i = 1, n do
        local key = KEYS[k + i]
        local left = call('DECRBY', key, ARGV[qty + i])
        stock[key] = left
        if left == 0 then
          zero(key)
        end
        if limited[i] then
          call('HINCRBY', KEYS[buyers + i], customer, ARGV[qty + i])
        end
      end
    end
  end
  o = o + 1
  out[o] = decision
  k, a = next_k, next_a
end
rec_flush()
out[3] = tostring(#zeros)
for z = 1, #zeros do
  out[o + z] = zeros[z]
end
return out
