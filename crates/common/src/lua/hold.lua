-- Cross-slot protocol, step 2: takes one claimed pre-deduction's share of stock in one
-- slot (its items whose stock keys live here), all of them or none, at most once per token.
--
-- KEYS[1]     the loaded marker of this slot
-- then, per order: its hold key in this slot (order id and token), then stock:{p} of each
--             of its items here, then stockpipe:buyers:{p} of each (limits and counts)
-- ARGV[1]     hold lifetime in seconds (the order records')
-- then, per order: token, n, the items here in canonical form, the customer or '',
--             n quantities, n product ids
--
-- The items here are judged by the rule of reserve.lua (DESIGN.md "Per-customer limits"):
-- no customer with a limited item is invalid; then item by item unknown, short, over the
-- limit. A hold takes the stock and counts the customer's units of each limited product;
-- it keeps the customer ('H|<items>|<customer>') for release.lua to give them back.
--
-- Returns {'unloaded'} (nothing done), or per order a kind and a detail:
--   'held' ''           taken now or before under this token
--   'freed' ''          taken before and given back: the order was refused; never again
--   'stale' ''          the token is older than this slot's load (a rebuild loaded it since
--                       the claim), or its hold here was given back as stale ('S'):
--                       nothing done, claim again under a new token
--   'short' <pid>       not enough stock of pid (nothing taken)
--   'unknown' <pid>     no stock key for pid (nothing taken)
--   'corrupt' <key>     a stock key, or the buyers hash whose count of the customer, that
--                       does not hold an integer (nothing taken)
--   'limit' <pid>       the customer would hold more of pid than its limit (nothing taken)
--   'invalid' ''        no customer, and an item here has a limit (nothing taken)
local marker = redis.call('GET', KEYS[1])
if not marker then
  return {'unloaded'}
end
local loaded = marker_gens(marker)
local out = {}
local k = 2
local a = 2
while a <= #ARGV do
  local token = ARGV[a]
  local n = tonumber(ARGV[a + 1])
  local items = ARGV[a + 2]
  local customer = ARGV[a + 3]
  local qty = a + 3
  local pid = a + 3 + n
  local hold_key = KEYS[k]
  local buyers = k + n
  local kind, detail = nil, ''
  if tonumber(string.match(token, '^([^.]*)')) < loaded then
    kind = 'stale'
  else
    local h = redis.call('GET', hold_key)
    if h then
      local state = string.sub(h, 1, 1)
      kind = (state == 'H' and 'held') or (state == 'S' and 'stale') or 'freed'
    else
      local limited = {}
      if customer == '' and any_limited(buyers, n) then
        kind = 'invalid'
      end
      if not kind then
        for i = 1, n do
          local raw = redis.call('GET', KEYS[k + i])
          if not raw then
            kind, detail = 'unknown', ARGV[pid + i]
            break
          end
          local have = integer(raw)
          if not have then
            kind, detail = 'corrupt', KEYS[k + i]
            break
          end
          local q = tonumber(ARGV[qty + i])
          if have < q then
            kind, detail = 'short', ARGV[pid + i]
            break
          end
          local limit = limit_check(KEYS[buyers + i], customer, q)
          if limit == 'over' then
            kind, detail = 'limit', ARGV[pid + i]
            break
          end
          if limit == 'corrupt' then
            kind, detail = 'corrupt', KEYS[buyers + i]
            break
          end
          limited[i] = limit == 'counts'
        end
      end
      if not kind then
        for i = 1, n do
          redis.call('DECRBY', KEYS[k + i], ARGV[qty + i])
          if limited[i] then
            redis.call('HINCRBY', KEYS[buyers + i], customer, ARGV[qty + i])
          end
        end
        local held = 'H|' .. items
        if customer ~= '' then
          held = held .. '|' .. customer
        end
        redis.call('SET', hold_key, held, 'EX', ARGV[1])
        kind = 'held'
      end
    end
  end
  out[#out + 1] = kind
  out[#out + 1] = detail
  k = k + 1 + 2 * n
  a = a + 4 + 2 * n
end
return out
