-- Cross-slot protocol: gives back one pre-deduction's share of stock in one slot, at most
-- once (its hold goes from 'H' to 'F' and is never taken again).
--
-- KEYS[1]     the loaded marker of this slot
-- KEYS[2]     the stock epoch counter of this slot (stock comes back: see reserve.lua)
-- then, per order: its hold key here, then stock:{p} of each of its items here, then
--             stockpipe:buyers:{p} of each
-- then, per order: the generation the give-back belongs to ('' : any), the mark a
--             released hold keeps ('F': given back, the order was refused or returned;
--             'S': given back because its token went stale, the order is claimed again
--             under a new one: lua/hold.lua answers 'stale' for it), n, n quantities
--
-- The hold's customer ('H|<items>|<customer>') gets back its units of each product that
-- still has a limit (as restore.lua does).
--
-- Returns {'unloaded'} (nothing done), or per order 'released', 'already' (given back
-- before), 'none' (no hold: never taken here, or forgotten) or 'stale' (Redis was rebuilt
-- since that generation: the rebuild's snapshot holds it).
local marker = redis.call('GET', KEYS[1])
if not marker then
  return {'unloaded'}
end
local loaded = marker_gens(marker)
local out = {}
local k = 3
local a = 1
while a <= #ARGV do
  local gen = ARGV[a]
  local mark = ARGV[a + 1]
  local n = tonumber(ARGV[a + 2])
  local hold_key = KEYS[k]
  local kind
  if stale_gen(gen, loaded) then
    kind = 'stale'
  else
    local h = redis.call('GET', hold_key)
    if not h then
      kind = 'none'
    elseif string.sub(h, 1, 1) ~= 'H' then
      kind = 'already'
    else
      local customer = string.match(h, '^H|[^|]*|(.*)$') or ''
      for i = 1, n do
        redis.call('INCRBY', KEYS[k + i], ARGV[a + 2 + i])
        give_back_units(KEYS[k + n + i], customer, tonumber(ARGV[a + 2 + i]))
      end
      redis.call('INCR', KEYS[2])
      redis.call('SET', hold_key, mark .. string.sub(h, 2), 'KEEPTTL')
      kind = 'released'
    end
  end
  out[#out + 1] = kind
  k = k + 1 + 2 * n
  a = a + 3 + n
end
return out
