-- A partial rebuild loaded other slots in generation ARGV[1]: this slot, still loaded,
-- names its new pre-deductions in it from now on, and keeps the generation it was loaded
-- in (lua/marker.lua). Never lowers the naming generation (a newer rebuild got here first).
--
-- KEYS[1]   this slot's loaded marker
-- ARGV[1]   the generation to name in
--
-- Returns 1 (renamed), or 0 (not loaded, or already named in that generation or a newer).
local m = redis.call('GET', KEYS[1])
if not m then
  return 0
end
local loaded, named = marker_gens(m)
if tonumber(named) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], string.format('%d/%s', loaded, ARGV[1]))
return 1
