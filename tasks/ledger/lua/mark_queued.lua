-- Each URL without a state becomes queued; returns how many did. Indexes in a run (i, i + 1, ...: the feeder
-- publishes in index order) are read and written as one range: two commands per run instead of two per URL.
-- KEYS[1] meta, KEYS[2] state; ARGV[1] ttl (s), ARGV[2..] indexes just published
local n, i = 0, 2
while i <= #ARGV do
  local first = tonumber(ARGV[i])
  local last = first
  while i < #ARGV and tonumber(ARGV[i + 1]) == last + 1 do
    i = i + 1
    last = last + 1
  end
  local had = redis.call('GETRANGE', KEYS[2], first, last)
  had = had .. string.rep('\0', last - first + 1 - #had)  -- past the end of the string: no state
  local now, k = string.gsub(had, '[^qsrdufc]', 'q')  -- a byte that is no state's code (states.lua NAME)
  if k > 0 then redis.call('SETRANGE', KEYS[2], first, now) end
  n = n + k
  i = i + 1
end
redis.call('HINCRBY', KEYS[1], 'n:queued', n)
redis.call('HINCRBY', KEYS[1], 'published', n)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]))
return n
