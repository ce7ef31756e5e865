-- The survey's §3.1 stock_deduct.lua, as `redis-lua` runs it (see survey/kv.rs).
-- KEYS[1]: the stock key; ARGV[1]: units to take.
-- Returns the stock left after taking, -1 when the key is missing, -2 when short.
-- Two changes to the survey's text: no EXPIRE (stock must not vanish after an hour), and
-- a shortage returns -2 instead of the current stock, which the survey's caller could not
-- tell from a success (it reads every result but -1 and negatives as "deducted").
local current_stock = redis.call('GET', KEYS[1])
if current_stock == false then
    return -1
end
current_stock = tonumber(current_stock)
local deduct_quantity = tonumber(ARGV[1])
if current_stock < deduct_quantity then
    return -2
end
local new_stock = current_stock - deduct_quantity
redis.call('SET', KEYS[1], new_stock)
return new_stock
