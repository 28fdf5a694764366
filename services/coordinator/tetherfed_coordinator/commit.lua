-- Write one scoring round atomically: decisions and the policy state they change.
-- A round is written at most once per (worker, snapshot version): `scored_version` guards it,
-- so a redelivered or reclaimed scoring entry never emits a decision twice.
-- KEYS: 1 worker hash, 2 decision counter, 3 federation stream, 4 worker stream,
--       5 merges hash, 6 cooldowns hash, 7 federation hash, then per partner snapshot k the
--       round's merges and drifts apply (k = 1..p): 8 + 3(k-1) that partner's snapshot meta
--       hash, 9 + 3(k-1) `Keys.pin` of the version, 10 + 3(k-1) its frame's first segment
-- ARGV: 1 version, 2 maxlen, 3 epoch, 4 n decisions, then n × (action, JSON body without id,
--       partner snapshot k | 0, layer), then m, m × (layer, merges added), then c,
--       c × (cooldown field, step), then the hold JSON ('' for none: HDEL), then p, the pin
--       TTL (ms), p × (partner snapshot version, its segment tag), then the scored_version the
--       round's state was read at (compare-and-set: -3 when another scorer committed a round
--       for this worker since, so the caller rescores with fresh state)
-- A decision names its partner's snapshot only while that snapshot can be pinned here, in the
-- same step: -4 (nothing written) when a partner published since the round read it (its
-- superseded frame is gone, or going); the caller rescores against the new snapshot. The pin
-- (a hash with a TTL) copies the snapshot meta hash and records, per decision, the layer it
-- needs (`d:<id>` → layer) and, per layer, where its bytes lie (`L:<layer>` → JSON
-- {lo, hi: segment indices; start, stop: byte offsets in the frame; dtype, shape: the tether's;
-- parts: a list of {name, start, stop, dtype, shape}, one per part of the layer in the frame
-- (`<layer>@weight`, `@bias`, `@model:<path>`: tether_protocol/frame.py), absent when it has
-- none}, lo..hi covering the tether and its parts); a publish replacing the snapshot keeps only
-- those segments, and an ack releases its decision's claim.
-- A federation being deleted loses its hash first: write nothing that would outlive it.
if redis.call('EXISTS', KEYS[7]) == 0 or redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
local scored = tonumber(redis.call('HGET', KEYS[1], 'scored_version') or '0')
if scored >= tonumber(ARGV[1]) then return -1 end
if scored ~= tonumber(ARGV[#ARGV]) then return -3 end
-- Find the pin arguments (after the decisions, merges, cooldowns and hold).
local i = 5 + 4 * tonumber(ARGV[4])
i = i + 1 + 2 * tonumber(ARGV[i])
i = i + 1 + 2 * tonumber(ARGV[i])
local p, ttl, at = tonumber(ARGV[i + 1]), ARGV[i + 2], i + 3
local pinnable = {}
for k = 1, p do
  local meta = KEYS[5 + 3 * k]
  local held = redis.call('HMGET', meta, 'version', 'tag')
  local version, tag = ARGV[at + 2 * (k - 1)], ARGV[at + 2 * (k - 1) + 1]
  if held[1] ~= version then return -4 end
  if held[2] then
    if held[2] ~= tag then return -4 end
    pinnable[k] = true
  end -- a frame stored whole (before segments) is not pinned: its next publish unlinks it
end

local function is_part(name, layer)
  -- Whether header entry `name` is a part of `layer`: `<layer>@` then weight or bias (either
  -- optionally `:<original>`) or model:<path>, with no further '@' (frame.py's _PART_RE).
  if string.sub(name, 1, #layer + 1) ~= layer .. '@' then return false end
  local kind = string.sub(name, #layer + 2)
  return kind == 'weight' or kind == 'bias' or string.match(kind, '^weight:[%w_]+$') ~= nil
    or string.match(kind, '^bias:[%w_]+$') ~= nil or string.match(kind, '^model:[^@%z]+$') ~= nil
end

local function locate(seg0, layer, count)
  -- Where `layer` and its parts lie in the frame whose first segment is `seg0`: its header is
  -- read here.
  local size = redis.call('STRLEN', seg0)
  local whole = cjson.encode({lo = 0, hi = count - 1})
  local head = redis.call('GETRANGE', seg0, 0, 7)
  if #head < 8 then return whole, size end
  local n = 0
  for j = 8, 1, -1 do n = n * 256 + string.byte(head, j) end
  if 8 + n > size then return whole, size end -- a header spanning segments: keep them all
  local ok, header = pcall(cjson.decode, redis.call('GETRANGE', seg0, 8, 7 + n))
  local e = ok and type(header) == 'table' and header[layer]
  if type(e) ~= 'table' or type(e.data_offsets) ~= 'table' then return whole, size end
  local start, stop = 8 + n + e.data_offsets[1], 8 + n + e.data_offsets[2]
  local first, last = start, stop > start and stop - 1 or start
  local parts = {}
  for name, p in pairs(header) do
    if type(p) == 'table' and type(p.data_offsets) == 'table' and is_part(name, layer) then
      local a, b = 8 + n + p.data_offsets[1], 8 + n + p.data_offsets[2]
      parts[#parts + 1] = {name = name, start = a, stop = b, dtype = p.dtype, shape = p.shape}
      if a < first then first = a end
      if b - 1 > last then last = b - 1 end
    end
  end
  local where = {lo = math.floor(first / size), hi = math.floor(last / size),
    start = start, stop = stop, dtype = e.dtype, shape = e.shape}
  if #parts > 0 then
    table.sort(parts, function(x, y) return x.start < y.start end)
    where.parts = parts
  end
  return cjson.encode(where), size
end

redis.call('HSET', KEYS[1], 'scored_version', ARGV[1])
i = 5
local ids, used = {}, {}
for _ = 1, tonumber(ARGV[4]) do
  local action, body, k, layer = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  i = i + 4
  local id = redis.call('INCR', KEYS[2])
  local doc = '{"id":' .. id .. ',' .. string.sub(body, 2)
  local sid = id .. '-0'
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], sid, 'd', doc)
  if action ~= 'hold' then
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], sid, 'd', doc)
  end
  if k > 0 and pinnable[k] then
    local meta, pin, seg0 = KEYS[5 + 3 * k], KEYS[6 + 3 * k], KEYS[7 + 3 * k]
    if redis.call('EXISTS', pin) == 0 then
      redis.call('HSET', pin, unpack(redis.call('HGETALL', meta)))
    end
    if redis.call('HEXISTS', pin, 'L:' .. layer) == 0 then
      local count = tonumber(redis.call('HGET', pin, 'segments'))
      local where, size = locate(seg0, layer, count)
      redis.call('HSET', pin, 'L:' .. layer, where, 'size', size)
    end
    redis.call('HSET', pin, 'd:' .. id, layer)
    used[k] = true
  end
  ids[#ids + 1] = id
end
for k = 1, p do
  if used[k] then redis.call('PEXPIRE', KEYS[6 + 3 * k], ttl) end
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
return ids
