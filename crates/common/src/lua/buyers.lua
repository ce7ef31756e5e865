-- Prepended to the scripts that take or give back stock (one home for the limit rule;
-- DESIGN.md "Per-customer limits"). A product's buyers hash (stockpipe:buyers:{<p>})
-- exists only while it has a limit: field '#limit', and one field per customer holding
-- units of it.

-- What a call has learnt of the buyers hashes, which its own writes do not change: whether
-- a hash exists, and its limit (false: none). A hash exists while its product has a limit.
local buyers_exist = {}
local buyers_limit = {}

-- Learns of every key in `keys` (buyers hashes, no repeats) at once: when none exists (no
-- product of the call has a limit: the usual case) one EXISTS answers for all of them,
-- instead of an EXISTS or HMGET per product; otherwise each is asked when first needed.
local function buyers_prefetch(keys)
  for from = 1, #keys, 1000 do
    if call('EXISTS', unpack(keys, from, math.min(from + 999, #keys))) > 0 then
      return
    end
  end
  for _, key in ipairs(keys) do
    buyers_exist[key] = false
    buyers_limit[key] = false
  end
end

-- Whether any of KEYS[from + 1 .. from + n] (buyers hashes) exists: an order without a
-- customer cannot buy a limited product.
local function any_limited(from, n)
  for i = 1, n do
    local key = KEYS[from + i]
    local e = buyers_exist[key]
    if e == nil then
      e = call('EXISTS', key) == 1
      buyers_exist[key] = e
    end
    if e then
      return true
    end
  end
  return false
end

-- What `q` more units of the product of hash `buyers` do to `customer`: 'over' (above the
-- limit), 'counts' (within it; the units are to be counted), nil (no limit, or no
-- customer), or 'corrupt' (the customer's count is not an integer: HINCRBY would refuse).
local function limit_check(buyers, customer, q)
  if customer == '' then
    return nil
  end
  local limit = buyers_limit[buyers]
  local held
  if limit == nil then
    local lim = call('HMGET', buyers, '#limit', customer)
    limit = tonumber(lim[1]) or false
    buyers_limit[buyers] = limit
    held = lim[2]
  elseif limit then
    held = call('HGET', buyers, customer)
  end
  if not limit then
    return nil
  end
  local units = 0
  if held then
    units = integer(held)
    if not units then
      return 'corrupt'
    end
  end
  if units + q > limit then
    return 'over'
  end
  return 'counts'
end

-- Gives `customer` back `q` units of the product of hash `buyers`, if it still has a
-- limit (a removed limit took every count with it); a count at 0 is deleted.
local function give_back_units(buyers, customer, q)
  if customer ~= '' and call('HEXISTS', buyers, '#limit') == 1 then
    if call('HINCRBY', buyers, customer, -q) <= 0 then
      call('HDEL', buyers, customer)
    end
  end
end
