-- Prepended to the scripts that name pre-deductions (one home for the rule).
--
-- A token is '<generation>.<n>'. On one Redis, n is the shared sequence. On a cluster each
-- slot has its own sequence, so n is 'seq * 16384 + slot': unique across slots, and exact
-- (Lua numbers are doubles, exact to 2^53: 5 * 10^11 pre-deductions per slot).
local function token_seq(seq, slot)
  if slot == '' then
    return tostring(seq)
  end
  return string.format('%.0f', seq * 16384 + tonumber(slot))
end
