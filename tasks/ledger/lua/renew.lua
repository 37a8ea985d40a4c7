-- Extend the leases that still exist (XX): a URL that reached its final state meanwhile is not given one again.
-- KEYS[1] due; ARGV[1] ms from now, ARGV[2..] indexes
local t = redis.call('TIME')
local at = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', at, ARGV[i]) end
return #ARGV - 1
