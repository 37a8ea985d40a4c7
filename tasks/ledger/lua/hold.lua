-- A lease for each URL that is not final, whether it had one or not (a worker holds its message).
-- KEYS[1] state, KEYS[2] due; ARGV[1] ms from now, ARGV[2..] indexes
local t = redis.call('TIME')
local at = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  local s = code_at(KEYS[1], tonumber(ARGV[i]))
  if not (s and FINAL[s]) then redis.call('ZADD', KEYS[2], at, ARGV[i]) end
end
return 0
