-- Prepended to the scripts that take or give back stock (one home for the limit rule;
-- DESIGN.md "Per-customer limits"). A product's buyers hash (stockpipe:buyers:{<p>})
-- exists only while it has a limit: field '#limit', and one field per customer holding
-- units of it.

-- Whether any of KEYS[from + 1 .. from + n] (buyers hashes) exists: an order without a
-- customer cannot buy a limited product.
local function any_limited(from, n)
  for i = 1, n do
    if redis.call('EXISTS', KEYS[from + i]) == 1 then
      return true
    end
  end
  return false
end

-- What `q` more units of the product of hash `buyers` do to `customer`: 'over' (above the
-- limit), 'counts' (within it; the units are to be counted), or nil (no limit, or no
-- customer).
local function limit_check(buyers, customer, q)
  if customer == '' then
    return nil
  end
  local lim = redis.call('HMGET', buyers, '#limit', customer)
  if not lim[1] then
    return nil
  end
  if (tonumber(lim[2]) or 0) + q > tonumber(lim[1]) then
    return 'over'
  end
  return 'counts'
end

-- Gives `customer` back `q` units of the product of hash `buyers`, if it still has a
-- limit (a removed limit took every count with it); a count at 0 is deleted.
local function give_back_units(buyers, customer, q)
  if customer ~= '' and redis.call('HEXISTS', buyers, '#limit') == 1 then
    if redis.call('HINCRBY', buyers, customer, -q) <= 0 then
      redis.call('HDEL', buyers, customer)
    end
  end
end
