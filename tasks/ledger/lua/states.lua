-- A library, not a script: put in front of the scripts that read or change a URL's state (ledger/scripts.py).
-- code_at(key, i): the state byte of URL i in the job's `state` string (nil: no state yet).
-- count(meta, code, n): the job's counter of that state moved by n. `started` has none: it is `published` less the
-- other states (records.counts_in), so a URL's start and end are one HINCRBY each instead of two.
-- announce_if_ended(meta, low): once no URL is left without a final state, "1" on the job's `ended` channel (the
-- meta key with 'ended' for 'meta'), so its followers report the end at once instead of at their next poll. Else,
-- when the job's messages out (published, not final) just fell to `low` and URLs wait in the ledger, the job's id
-- on `ff:feed`: the workers' feeders top its window up at once instead of at their next tick (feed.Feeder).
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
local function count(meta, code, n)
  if code ~= 's' then redis.call('HINCRBY', meta, 'n:' .. NAME[code], n) end
end
local function announce_if_ended(meta, low)
  local n = redis.call('HMGET', meta, 'total', 'n:done', 'n:unchanged', 'n:failed', 'n:cancelled', 'published', 'fed')
  local total = tonumber(n[1])
  if not total then return end
  local final = 0
  for i = 2, 5 do final = final + (tonumber(n[i]) or 0) end
  if final >= total then
    redis.call('PUBLISH', string.sub(meta, 1, -5) .. 'ended', '1')
  elseif low and n[7] and tonumber(n[7]) < total and (tonumber(n[6]) or 0) - final == low then
    redis.call('PUBLISH', 'ff:feed', string.sub(meta, 5, -7))  -- ff:{JOB}:meta -> JOB
  end
end
