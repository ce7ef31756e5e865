-- Cross-slot protocol, step 1 (cluster only; see DESIGN "Orders across hash slots"):
-- claims each order id in its record's slot, naming the pre-deduction about to be taken.
--
-- KEYS[1]     the loaded marker of this slot (its value: the generation)
-- KEYS[2]     the sequence counter of this slot
-- KEYS[3..]   each order's record
-- ARGV[1]     record lifetime in seconds
-- ARGV[2]     this slot (tokens are unique across slots: token.lua)
-- ARGV[3..]   each order's items in canonical form
--
-- Returns {'unloaded'} (nothing done), or per order a kind and a record: 'seen' and the
-- record found (the order was claimed or decided before: nothing done), or 'claimed' and
-- the new record 'P|<token>|<items>'.
local marker = redis.call('GET', KEYS[1])
if not marker then
  return {'unloaded'}
end
local next_seq = nil
local last_seq = 0
local out = {}
for i = 3, #KEYS do
  local rec = redis.call('GET', KEYS[i])
  if rec then
    out[#out + 1] = 'seen'
    out[#out + 1] = rec
  else
    if not next_seq or next_seq > last_seq then
      last_seq = redis.call('INCRBY', KEYS[2], 100)
      next_seq = last_seq - 99
    end
    local claim = 'P|' .. marker .. '.' .. token_seq(next_seq, ARGV[2]) .. '|' .. ARGV[i]
    next_seq = next_seq + 1
    redis.call('SET', KEYS[i], claim, 'EX', ARGV[1])
    out[#out + 1] = 'claimed'
    out[#out + 1] = claim
  end
end
return out
