-- Prepended to the scripts that read a slot's loaded marker (one home for its form, as
-- redis_store/slots.rs `Marker` reads it): '<loaded>', or '<loaded>/<named>' once a
-- partial rebuild loaded other slots. Returns the generation this slot (or this Redis) was
-- loaded in, as a number: a give-back or hold of an older generation is stale here, the
-- load's snapshot holds it. And the generation new pre-deductions are named in, as text:
-- never below any slot's loaded generation, so an order claimed here is new enough for
-- every slot it holds in.
local function marker_gens(m)
  local loaded, named = string.match(m, '^(%d+)/(%d+)$')
  if loaded then
    return tonumber(loaded), named
  end
  return tonumber(m), m
end

-- Whether a give-back or change of generation `gen` ('' : any) comes from before this
-- slot's load (its snapshot holds it: do nothing).
local function stale_gen(gen, loaded)
  return gen ~= '' and tonumber(gen) < loaded
end
