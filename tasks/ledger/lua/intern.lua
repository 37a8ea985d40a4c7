-- The small number of a worker name or content type in this job (given once, kept: packed records store numbers).
-- KEYS[1] names; ARGV[1] 'w:<worker>' or 'c:<content type>', ARGV[2] the value, ARGV[3] ttl (s)
local c = redis.call('HGET', KEYS[1], ARGV[1])
if c then return tonumber(c) end
c = redis.call('HINCRBY', KEYS[1], '#', 1)
redis.call('HSET', KEYS[1], ARGV[1], c, '#' .. c, ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return c
