-- Adds (or with a negative delta, takes) stock for an operator's request, at most once per
-- request id.
--
-- KEYS[1]   the "loaded" marker
-- KEYS[2]   stock:{product_id}
-- KEYS[3]   the request's marker
-- KEYS[4]   the stock epoch counter, incremented with every change (see reserve.lua)
-- ARGV[1]   delta (integer, may be negative)
-- ARGV[2]   marker lifetime in seconds
--
-- Returns 'applied', 'already' (this request was applied before), 'unloaded' (nothing
-- done), or 'short' (taking would go below zero; nothing done).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'unloaded'
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  return 'already'
end
local delta = tonumber(ARGV[1])
if delta < 0 then
  local have = tonumber(redis.call('GET', KEYS[2]) or '0')
  if not have or have + delta < 0 then
    return 'short'
  end
end
redis.call('INCRBY', KEYS[2], delta)
redis.call('INCR', KEYS[4])
redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[2])
return 'applied'
