-- A library, not a script: put in front of the scripts that read or change a URL's state (ledger/scripts.py).
-- code_at(key, i): the state byte of URL i in the job's `state` string (nil: no state yet).
-- count(meta, code, n): the job's counter of that state moved by n.
-- announce_if_ended(meta): once no URL is left without a final state, "1" on the job's `ended` channel (the
-- meta key with 'ended' for 'meta'), so its followers report the end at once instead of at their next poll.
local NAME = {q='queued', s='started', r='retrying', d='done', u='unchanged', f='failed', c='cancelled'}
local CODE = {queued='q', started='s', retrying='r', done='d', unchanged='u', failed='f', cancelled='c'}
local FINAL = {d=true, u=true, f=true, c=true}
local function code_at(key, i)
  local b = redis.call('GETRANGE', key, i, i)
  if NAME[b] then return b end
  return nil
end
-- now_ms(): the server's clock in ms, read once per script run (TIME).
local _now
local function now_ms()
  if not _now then
    local t = redis.call('TIME')
    _now = t[1] * 1000 + math.floor(t[2] / 1000)
  end
  return _now
end
local function count(meta, code, n) redis.call('HINCRBY', meta, 'n:' .. NAME[code], n) end
local function announce_if_ended(meta)
  local n = redis.call('HMGET', meta, 'total', 'n:done', 'n:unchanged', 'n:failed', 'n:cancelled')
  local left = tonumber(n[1])
  if not left then return end
  for i = 2, 5 do left = left - (tonumber(n[i]) or 0) end
  if left <= 0 then redis.call('PUBLISH', string.sub(meta, 1, -5) .. 'ended', '1') end
end
