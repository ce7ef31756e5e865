-- The survey's §3.2 acquireLock script: SET NX EX.
-- KEYS[1]: the lock key; ARGV[1]: this holder's token; ARGV[2]: seconds before it expires.
-- Returns 1 when acquired, 0 when another holder has it.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
    return 1
else
    return 0
end
