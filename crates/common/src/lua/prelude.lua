-- Prepended to every script, first (redis_store.rs `lua_source`): what the scripts read
-- per order, as locals of the chunk. A global (redis, KEYS, string) is a table look-up at
-- every read; a local is a register or an upvalue.
local call = redis.call
local KEYS, ARGV = KEYS, ARGV
local tonumber = tonumber
local byte, sub, format = string.byte, string.sub, string.format

-- tonumber of the small numbers every order carries (its item count, its quantities): a
-- text seen before in the call is a table look-up instead of Lua's tonumber, a strtod
-- (about 1,700 instructions each, issue 12's callgrind count).
local small_num = {}
local function num(s)
  local v = small_num[s]
  if v == nil then
    v = tonumber(s)
    small_num[s] = v
  end
  return v
end
