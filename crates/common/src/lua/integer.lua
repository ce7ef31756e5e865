-- Prepended to the scripts that read stock (one home for the rule).
--
-- A stock value is an integer only if it is written as one: optional '-', 1 to 18 digits
-- (tonumber would take ' 5', '1e5' or '0x10', which DECRBY then refuses mid-script).
local function integer(raw)
  local digits = string.match(raw, '^%-?(%d+)$')
  if not digits or string.len(digits) > 18 then
    return nil
  end
  return tonumber(raw)
end
