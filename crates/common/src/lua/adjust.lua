-- Adds (or with a negative delta, takes) stock for an operator's request, at most once per
-- request id, and only in the Redis generation the request belongs to.
--
-- KEYS[1]   the "loaded" marker (its value is the Redis generation)
-- KEYS[2]   stock:{product_id}
-- KEYS[3]   the request's marker
-- KEYS[4]   the stock epoch counter, incremented with every change (see reserve.lua)
-- ARGV[1]   delta: an integer, may be negative
-- ARGV[2]   marker lifetime in seconds
-- ARGV[3]   the generation this change belongs to ('' : the current one)
-- ARGV[4]   the product id, recorded in the marker with the delta
--
-- Returns 'applied', 'already' (this request was applied before), 'reused' (the request id
-- was applied to another product or amount; nothing done), 'unloaded' (nothing done),
-- 'stale' (Redis was rebuilt since: the rebuild loaded the change from PostgreSQL),
-- 'corrupt' (the key holds something that is not an integer), or 'short' (taking would go
-- below zero; nothing done). All arithmetic is Redis' 64-bit integer arithmetic: Lua's
-- numbers are doubles, exact only up to 2^53.
local marker = redis.call('GET', KEYS[1])
if not marker then
  return 'unloaded'
end
if stale_gen(ARGV[3], (marker_gens(marker))) then
  return 'stale'
end
local seen = redis.call('GET', KEYS[3])
local mark = ARGV[4] .. ':' .. ARGV[1]
if seen then
  if seen == mark then
    return 'already'
  end
  return 'reused'
end
local raw = redis.call('GET', KEYS[2])
if raw and not string.match(raw, '^%-?%d+$') then
  return 'corrupt'
end
local take = string.match(ARGV[1], '^%-(%d+)$')
if take then
  if not raw or redis.call('DECRBY', KEYS[2], take) < 0 then
    if not raw then
      return 'short'
    end
    redis.call('INCRBY', KEYS[2], take)
    return 'short'
  end
else
  redis.call('INCRBY', KEYS[2], ARGV[1])
end
redis.call('INCR', KEYS[4])
redis.call('SET', KEYS[3], mark, 'EX', ARGV[2])
return 'applied'
