-- Write one scoring round atomically: decisions and the policy state they change.
-- A round is written at most once per (worker, snapshot version): `scored_version` guards it,
-- so a redelivered or reclaimed scoring entry never emits a decision twice.
-- KEYS: 1 worker hash, 2 decision counter, 3 federation stream, 4 worker stream,
--       5 merges hash, 6 cooldowns hash, 7 federation hash
-- ARGV: 1 version, 2 maxlen, 3 epoch, 4 n decisions, then n × (action, JSON body without id),
--       then m, m × (layer, merges added), then c, c × (cooldown field, step), then the
--       hold JSON ('' for none: HDEL), then p, the pin TTL (ms), p × partner snapshot version
--       (KEYS 8 + 2(k-1), 9 + 2(k-1): that partner's snapshot meta hash and `Keys.pin` of the
--       version: a decision names it, so it stays readable after a newer publish), then the
--       scored_version the round's state was read at (compare-and-set: -3 when another
--       scorer committed a round for this worker since, so the caller rescores with fresh state)
-- A federation being deleted loses its hash first: write nothing that would outlive it.
if redis.call('EXISTS', KEYS[7]) == 0 or redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
local scored = tonumber(redis.call('HGET', KEYS[1], 'scored_version') or '0')
if scored >= tonumber(ARGV[1]) then return -1 end
if scored ~= tonumber(ARGV[#ARGV]) then return -3 end
redis.call('HSET', KEYS[1], 'scored_version', ARGV[1])
local i = 5
local ids = {}
for _ = 1, tonumber(ARGV[4]) do
  local action, body = ARGV[i], ARGV[i + 1]
  i = i + 2
  local id = redis.call('INCR', KEYS[2])
  local doc = '{"id":' .. id .. ',' .. string.sub(body, 2)
  local sid = id .. '-0'
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], sid, 'd', doc)
  if action ~= 'hold' then
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], sid, 'd', doc)
  end
  ids[#ids + 1] = id
end
if redis.call('HGET', KEYS[5], '__epoch') ~= ARGV[3] then
  redis.call('DEL', KEYS[5])
  redis.call('HSET', KEYS[5], '__epoch', ARGV[3])
end
local m = tonumber(ARGV[i])
i = i + 1
for _ = 1, m do
  redis.call('HINCRBY', KEYS[5], ARGV[i], ARGV[i + 1])
  i = i + 2
end
local c = tonumber(ARGV[i])
i = i + 1
for _ = 1, c do
  redis.call('HSET', KEYS[6], ARGV[i], ARGV[i + 1])
  i = i + 2
end
if ARGV[i] == '' then
  redis.call('HDEL', KEYS[1], 'hold')
else
  redis.call('HSET', KEYS[1], 'hold', ARGV[i])
end
local p, ttl = tonumber(ARGV[i + 1]), ARGV[i + 2]
i = i + 3
for k = 1, p do
  local meta, pin = KEYS[6 + 2 * k], KEYS[7 + 2 * k]
  if redis.call('HGET', meta, 'version') == ARGV[i] and redis.call('HEXISTS', meta, 'tag') == 1 then
    if redis.call('EXISTS', pin) == 0 then
      redis.call('HSET', pin, unpack(redis.call('HGETALL', meta)))
    end
    redis.call('PEXPIRE', pin, ttl)
  end
  i = i + 1
end
return ids
