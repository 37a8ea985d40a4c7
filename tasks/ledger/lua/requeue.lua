-- Each URL not final goes back to queued (counters kept), loses its lease and counts one more redelivery.
-- Returns {index, redeliveries, ...} for the URLs moved.
-- KEYS[1] meta, KEYS[2] state, KEYS[3] due, KEYS[4] redelivered; ARGV[1..] indexes
local out = {}
for i = 1, #ARGV do
  local old = code_at(KEYS[2], tonumber(ARGV[i]))
  redis.call('ZREM', KEYS[3], ARGV[i])
  if not (old and FINAL[old]) then
    if old ~= 'q' then
      redis.call('SETRANGE', KEYS[2], tonumber(ARGV[i]), 'q')
      if old then count(KEYS[1], old, -1) else redis.call('HINCRBY', KEYS[1], 'published', 1) end
      count(KEYS[1], 'q', 1)
    end
    table.insert(out, tonumber(ARGV[i]))
    table.insert(out, redis.call('HINCRBY', KEYS[4], ARGV[i], 1))
  end
end
local ttl = redis.call('TTL', KEYS[1])
if ttl > 0 then redis.call('EXPIRE', KEYS[4], ttl) end
return out
