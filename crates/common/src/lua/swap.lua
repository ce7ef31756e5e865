-- Cross-slot protocol: moves order records from one state to the next, each only from the
-- state the caller saw ('P|<token>|' to a decision; 'R|<token>|' to 'C|<token>|...').
--
-- KEYS[1]     the loaded marker of this slot
-- KEYS[2..]   the base of each order's record (lua/record.lua)
-- ARGV        per order: its record field, the prefix the record must start with, the record to
--             write
--
-- Returns {'unloaded'} (nothing done), or per order a kind and a record: 'new' (written),
-- 'seen' and the record found (another state: nothing done), or 'lost' and '' (no record:
-- forgotten, or dropped by a rebuild).
local marker = redis.call('GET', KEYS[1])
if not marker then
  return {'unloaded'}
end
local out = {}
for i = 2, #KEYS do
  local id, want, new = ARGV[3 * i - 5], ARGV[3 * i - 4], ARGV[3 * i - 3]
  local rec, rec_at = rec_find(KEYS[i], id, rec_hash(id))
  if not rec then
    out[#out + 1] = 'lost'
    out[#out + 1] = ''
  elseif string.sub(rec, 1, string.len(want)) == want then
    rec_update(rec_at, id, new)
    out[#out + 1] = 'new'
    out[#out + 1] = new
  else
    out[#out + 1] = 'seen'
    out[#out + 1] = rec
  end
end
return out
