-- Move one URL to a state. Returns the final state the URL already had (then nothing changes), or false. A URL
-- about to start in a job that was cancelled (meta field `cancelled`) ends cancelled instead, and 'cancelled' is
-- returned: the worker skips it in the same round trip. A URL without a state yet counts as published
-- (`published` = URLs that have a state): its message was taken before the publisher marked it queued.
-- The keys keep the expiry the job was created with (rec and due never empty: ledger/keys.py KEEP).
-- KEYS[1] meta, KEYS[2] state, KEYS[3] rec, KEYS[4] due
-- ARGV[1] index, ARGV[2] new state, ARGV[3] final record ('' = none), ARGV[4] bytes to count,
-- ARGV[5] ms from now by which a worker must be heard of again for this URL (its lease); '' = none (final),
-- ARGV[6] (optional) the job's messages out at which a final state wakes the feeders (states.lua announce_if_ended)
local i = tonumber(ARGV[1])
local old = code_at(KEYS[2], i)
if old and FINAL[old] then return NAME[old] end
if not old then redis.call('HINCRBY', KEYS[1], 'published', 1) end
local new = CODE[ARGV[2]]
if new == 's' and redis.call('HEXISTS', KEYS[1], 'cancelled') == 1 then
  redis.call('SETRANGE', KEYS[2], i, 'c')
  if old then count(KEYS[1], old, -1) end
  count(KEYS[1], 'c', 1)
  redis.call('ZREM', KEYS[4], ARGV[1])
  announce_if_ended(KEYS[1], nil)
  return 'cancelled'
end
if old ~= new then
  redis.call('SETRANGE', KEYS[2], i, new)
  if old then count(KEYS[1], old, -1) end
  count(KEYS[1], new, 1)
  if FINAL[new] then announce_if_ended(KEYS[1], tonumber(ARGV[6])) end
end
if ARGV[5] == '' then
  redis.call('ZREM', KEYS[4], ARGV[1])
else
  redis.call('ZADD', KEYS[4], now_ms() + tonumber(ARGV[5]), ARGV[1])
end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
  if ARGV[4] ~= '0' then redis.call('HINCRBY', KEYS[1], 'bytes', tonumber(ARGV[4])) end
end
return false
