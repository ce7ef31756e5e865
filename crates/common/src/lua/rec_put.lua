-- Writes order records as a load has them (lua/record.lua): each one replaces the
-- order's record, or is its first.
--
-- KEYS[1]     the base of these orders' records
-- ARGV[1]     record memory in seconds
-- ARGV[2..]   per order: its record field, its record
--
-- Returns the number of records written.
local base = KEYS[1]
for j = 2, #ARGV, 2 do
  local id = ARGV[j]
  local h = rec_hash(id)
  local _, at = rec_find(base, id, h)
  if at then
    rec_update(at, id, ARGV[j + 1])
  else
    rec_insert(base, id, h, ARGV[j + 1], ARGV[1])
  end
end
rec_flush()
return (#ARGV - 1) / 2
