-- Flags the job (a URL about to start then ends cancelled instead, a running one stops at its next chunk) in the
-- same step as each URL not started and not final (never published, queued, retrying) becomes cancelled: none
-- starts in between. A URL never published counts as published. Started ones are left to their worker.
-- Returns the count.
-- KEYS[1] meta, KEYS[2] state, KEYS[3] due; ARGV[1] ttl (s), ARGV[2] when the job was cancelled ('' = flagged
-- already), ARGV[3..] indexes
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'cancelled', ARGV[2]) end
local n = 0
for i = 3, #ARGV do
  local at = tonumber(ARGV[i])
  local old = code_at(KEYS[2], at)
  if not old or old == 'q' or old == 'r' then
    redis.call('SETRANGE', KEYS[2], at, 'c')
    if old then count(KEYS[1], old, -1) else redis.call('HINCRBY', KEYS[1], 'published', 1) end
    count(KEYS[1], 'c', 1)
    redis.call('ZREM', KEYS[3], ARGV[i])
    n = n + 1
  end
end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]))
if n > 0 then announce_if_ended(KEYS[1]) end
return n
