-- Reads one order's record with its slot's loaded marker (lua/record.lua).
--
-- KEYS[1]     the loaded marker of the record's slot (on one Redis, of the whole)
-- KEYS[2]     the base of the order's record
-- ARGV[1]     the order's record field
--
-- Returns {marker or '', record or '', when the record is forgotten (Unix seconds) or -2}.
local id = ARGV[1]
local rec, at = rec_find(KEYS[2], id, rec_hash(id))
local expires = -2
if at then
  expires = redis.call('EXPIRETIME', at)
end
return {redis.call('GET', KEYS[1]) or '', rec or '', expires}
