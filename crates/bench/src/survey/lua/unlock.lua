-- The survey's §3.2 releaseLock script: delete the lock only if this holder has it.
-- KEYS[1]: the lock key; ARGV[1]: this holder's token. Returns the keys deleted (0 or 1).
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
else
    return 0
end
