-- Gives an order's pre-deducted stock back, at most once per order id.
--
-- KEYS[1]     the "loaded" marker
-- KEYS[2]     the stock epoch counter, incremented when stock comes back (see reserve.lua)
-- KEYS[3]     the order's record
-- KEYS[4..]   stock:{product_id} of each item
-- ARGV[1]     the order's items in canonical form, as the record must hold them
-- ARGV[2..]   quantity of each item
--
-- Returns 'restored', 'already' (given back before), 'unloaded' (nothing done),
-- 'unknown' (no record: never held here, or forgotten), 'not_held' (the order was refused
-- here), or 'mismatch' (the record holds other items).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'unloaded'
end
local rec = redis.call('GET', KEYS[3])
if not rec then
  return 'unknown'
end
local state = string.sub(rec, 1, 1)
if state == 'C' then
  return 'already'
end
if state ~= 'R' then
  return 'not_held'
end
if string.sub(rec, 3) ~= ARGV[1] then
  return 'mismatch'
end
for i = 4, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[i - 2])
end
redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[3], 'C|' .. ARGV[1], 'KEEPTTL')
return 'restored'
