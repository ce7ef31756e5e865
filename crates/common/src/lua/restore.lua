-- Gives one pre-deduction of an order back, at most once.
--
-- KEYS[1]     the "loaded" marker (its value is the Redis generation)
-- KEYS[2]     the stock epoch counter, incremented when stock comes back (see reserve.lua)
-- KEYS[3]     the base of the order's record (lua/record.lua)
-- KEYS[4..]   stock:{product_id} of each item, then stockpipe:buyers:{product_id} of each
-- ARGV[1]     the pre-deduction's token ('' for a compensation from before tokens: any)
-- ARGV[2]     the generation of the PostgreSQL change behind the compensation ('' : any)
-- ARGV[3]     the order's items in canonical form, as the record must hold them
-- ARGV[4]     the order's record field (lua/record.lua)
-- ARGV[5..]   quantity of each item
--
-- The record's customer (if any) gets back the units it holds of each product that still
-- has a limit: whether a product counts is fixed within a generation, and removing a limit
-- drops its counts (DESIGN.md "Per-customer limits"), so this undoes exactly what the
-- reservation counted.
--
-- Returns 'restored', 'already' (given back before), 'unloaded' (nothing done), 'stale'
-- (Redis was rebuilt since that change: the rebuild's snapshot already holds it),
-- 'unknown' (no record: never held here, or forgotten), 'other' (the record names another
-- pre-deduction: this one is not held in this Redis), 'not_held' (the order was refused
-- here), or 'mismatch' (the record holds other items).
local marker = redis.call('GET', KEYS[1])
if not marker then
  return 'unloaded'
end
if stale_gen(ARGV[2], (marker_gens(marker))) then
  return 'stale'
end
local id = ARGV[4]
local rec, rec_at = rec_find(KEYS[3], id, rec_hash(id))
if not rec then
  return 'unknown'
end
local state, token, items, rest = string.match(rec, '^(%u)|([^|]*)|([^|]*)(.*)$')
if state ~= 'R' and state ~= 'C' then
  return 'not_held'
end
if ARGV[1] ~= '' and token ~= ARGV[1] then
  return 'other'
end
if state == 'C' then
  return 'already'
end
if items ~= ARGV[3] then
  return 'mismatch'
end
local n = #ARGV - 4
local customer = string.sub(rest, 2)
for i = 1, n do
  redis.call('INCRBY', KEYS[3 + i], ARGV[4 + i])
  give_back_units(KEYS[3 + n + i], customer, tonumber(ARGV[4 + i]))
end
redis.call('INCR', KEYS[2])
rec_update(rec_at, id, 'C|' .. token .. '|' .. ARGV[3] .. rest)
return 'restored'
