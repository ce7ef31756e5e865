-- Prepended to the scripts that name pre-deductions (one home for the rule).
--
-- A token is '<generation>.<n>'. On one Redis, n is the shared sequence. On a cluster each
-- slot has its own sequence, so n is 'seq * 16384 + slot': unique across slots, and exact
-- (Lua numbers are doubles, exact to 2^53: 5 * 10^11 pre-deductions per slot).
--
-- Written with '%d' (a C long): exact, and an integer conversion. Lua's tostring is
-- '%.14g', which turns 10^14 and above into an exponent (two pre-deductions would share a
-- name) and costs a floating-point printf per pre-deduction (3% of Redis's time, issue 12).
local function token_seq(seq, slot)
  if slot == '' then
    return string.format('%d', seq)
  end
  return string.format('%d', seq * 16384 + tonumber(slot))
end

-- The sequence part of one more token, from the counter `seq_key`: one INCRBY per 100
-- tokens of a call.
local next_seq = nil
local last_seq = 0
local function new_seq(seq_key, slot)
  if not next_seq or next_seq > last_seq then
    last_seq = call('INCRBY', seq_key, 100)
    next_seq = last_seq - 99
  end
  local t = token_seq(next_seq, slot)
  next_seq = next_seq + 1
  return t
end

-- A record naming one more pre-deduction of generation `marker`:
-- '<kind>|<marker>.<seq>|<items>', then '|<customer>' unless customer is '' or nil. Built
-- in one concatenation: a string less per order than the token and then the record.
local function token_record(kind, marker, seq_key, slot, items, customer)
  local seq = new_seq(seq_key, slot)
  if not customer or customer == '' then
    return kind .. '|' .. marker .. '.' .. seq .. '|' .. items
  end
  return kind .. '|' .. marker .. '.' .. seq .. '|' .. items .. '|' .. customer
end
