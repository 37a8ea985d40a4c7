-- Each URL without a state becomes queued; returns how many did.
-- KEYS[1] meta, KEYS[2] state; ARGV[1] ttl (s), ARGV[2..] indexes just published
local n = 0
for i = 2, #ARGV do
  local at = tonumber(ARGV[i])
  if not code_at(KEYS[2], at) then
    redis.call('SETRANGE', KEYS[2], at, 'q')
    n = n + 1
  end
end
redis.call('HINCRBY', KEYS[1], 'n:queued', n)
redis.call('HINCRBY', KEYS[1], 'published', n)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]))
return n
