-- Each cancelled URL goes back to "never published" (no state, no record), for `resume`. Returns the count.
-- KEYS[1] meta, KEYS[2] state, KEYS[3] rec; ARGV[1..] indexes
local n = 0
for i = 1, #ARGV do
  local at = tonumber(ARGV[i])
  if code_at(KEYS[2], at) == 'c' then
    redis.call('SETRANGE', KEYS[2], at, string.char(0))
    redis.call('HDEL', KEYS[3], ARGV[i])
    count(KEYS[1], 'c', -1)
    redis.call('HINCRBY', KEYS[1], 'published', -1)
    n = n + 1
  end
end
return n
