-- Applies an operator's change of one product's per-customer limit that PostgreSQL made
-- first (DESIGN.md "Per-customer limits"): sets it in place, or removes it with every
-- customer's count. A limit is never added here: a product without one gets it by a load
-- (`stockctl limit` rebuilds), which loads the customers' counts with it.
--
-- KEYS[1]     the "loaded" marker (its value is the Redis generation)
-- KEYS[2]     stockpipe:buyers:{product_id}: field '#limit', field '#version', and one
--             field per customer holding units
-- ARGV[1]     the generation of the PostgreSQL change ('' : any)
-- ARGV[2]     the change's version (PostgreSQL's, increasing per change)
-- ARGV[3]     the new limit, or '' to remove it
--
-- Returns 'applied', 'already' (this version or a newer one is here, or there is no limit
-- to remove), 'absent' (the product has no limit here: only a load can add one),
-- 'unloaded' or 'stale' (Redis was rebuilt since the change: the load holds it).
local marker = redis.call('GET', KEYS[1])
if not marker then
  return 'unloaded'
end
if stale_gen(ARGV[1], (marker_gens(marker))) then
  return 'stale'
end
local have = redis.call('HGET', KEYS[2], '#version')
if not have then
  if ARGV[3] == '' then
    return 'already'
  end
  return 'absent'
end
if tonumber(have) >= tonumber(ARGV[2]) then
  return 'already'
end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[2])
else
  redis.call('HSET', KEYS[2], '#limit', ARGV[3], '#version', ARGV[2])
end
return 'applied'
