-- The survey's §7.1 deductSingleShard script, unchanged.
-- KEYS[1]: one shard of a product's stock; ARGV[1]: units to take from it.
-- Returns 1 when taken, 0 when the shard holds fewer (a missing shard holds 0).
local shard_key = KEYS[1]
local deduct_quantity = tonumber(ARGV[1])

local current_stock = redis.call('GET', shard_key)
if current_stock == false then
    current_stock = 0
else
    current_stock = tonumber(current_stock)
end

if current_stock < deduct_quantity then
    return 0
end

local new_stock = current_stock - deduct_quantity
redis.call('SET', shard_key, new_stock)
return 1
