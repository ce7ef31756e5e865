-- Pre-deducts one order's stock, all items or none, at most once per order id.
--
-- KEYS[1]     the "loaded" marker: absent means Redis lost its data and was not rebuilt
-- KEYS[2]     the order's record
-- KEYS[3..]   stock:{product_id} of each item, in the order's item order
-- ARGV[1]     record lifetime in seconds
-- ARGV[2]     the order's items in canonical form "42:2,7:1"
-- ARGV[3]     a forced decision ("X|invalid_order|") or "" to decide on stock
-- ARGV[4..]   quantity of each item, then product id of each item
--
-- Returns {kind, record}: kind is 'new' (decided now), 'seen' (decided before; record is the
-- first decision, nothing changed), 'unloaded' (nothing done), or 'corrupt' (a stock key
-- does not hold an integer; nothing done). Records: 'R|<items>' stock held,
-- 'C|<items>' held then given back, 'X|<reason>|<product_id>' refused.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unloaded', ''}
end
local rec = redis.call('GET', KEYS[2])
if rec then
  return {'seen', rec}
end
local ttl = ARGV[1]
local decision = ARGV[3]
local n = #KEYS - 2
if decision == '' then
  for i = 1, n do
    local raw = redis.call('GET', KEYS[i + 2])
    if not raw then
      decision = 'X|unknown_product|' .. ARGV[3 + n + i]
      break
    end
    local have = tonumber(raw)
    if not have then
      return {'corrupt', KEYS[i + 2]}
    end
    if have < tonumber(ARGV[3 + i]) then
      decision = 'X|insufficient_stock|' .. ARGV[3 + n + i]
      break
    end
  end
end
if decision == '' then
  for i = 1, n do
    redis.call('DECRBY', KEYS[i + 2], ARGV[3 + i])
  end
  decision = 'R|' .. ARGV[2]
end
redis.call('SET', KEYS[2], decision, 'EX', ttl)
return {'new', decision}
