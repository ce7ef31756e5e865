-- Cross-slot protocol, step 1 (cluster only; see DESIGN "Orders across hash slots"):
-- claims each order id in its record's slot, naming the pre-deduction about to be taken.
--
-- KEYS[1]     the loaded marker of this slot (its value: the generation)
-- KEYS[2]     the sequence counter of this slot
-- KEYS[3..]   the base of each order's record (lua/record.lua)
-- ARGV[1]     record memory in seconds
-- ARGV[2]     this slot (tokens are unique across slots: token.lua)
-- ARGV[3..]   per order: its record field, its items in canonical form, then the token of a claim
--             or decision it replaces ('' : none): a record naming that token ('P|<t>|'
--             or 'R|<t>|', whose holds the caller gave back) gets a new claim
--
-- Returns {'unloaded'} (nothing done), or per order a kind and a record: 'seen' and the
-- record found (the order was claimed or decided before: nothing done), or 'claimed' and
-- the new record 'P|<token>|<items>'.
local marker = redis.call('GET', KEYS[1])
if not marker then
  return {'unloaded'}
end
local _, named = marker_gens(marker)
local out = {}
for i = 3, #KEYS do
  local id, items, replaced = ARGV[3 * i - 6], ARGV[3 * i - 5], ARGV[3 * i - 4]
  local h = rec_hash(id)
  local rec, rec_at = rec_find(KEYS[i], id, h)
  if rec and replaced ~= '' then
    local state, token = string.match(rec, '^([PR])|([^|]*)|')
    if state and token == replaced then
      rec = nil
    end
  end
  if rec then
    out[#out + 1] = 'seen'
    out[#out + 1] = rec
  else
    local claim = token_record('P', named, KEYS[2], ARGV[2], items)
    if rec_at then
      rec_update(rec_at, id, claim)
    else
      rec_insert(KEYS[i], id, h, claim, ARGV[1])
    end
    out[#out + 1] = 'claimed'
    out[#out + 1] = claim
  end
end
rec_flush()
return out
