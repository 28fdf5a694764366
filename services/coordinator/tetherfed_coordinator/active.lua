-- The federation's active workers and their latest versions, in one round trip (a scoring
-- round of a 1,000-worker federation otherwise sends ~4,000 commands from Python).
-- KEYS: 1 the federation's worker set (every key read below shares its hash tag: one slot)
-- ARGV: 1 worker key prefix (worker key = prefix .. id), 2 alive key suffix, 3 snapshot meta
--       suffix, 4 sketch hash suffix ('' : do not read sketch versions), 5 '1': every worker
--       (lost and left ones too), 6.. ids to include while lost (not when they left)
-- Returns a flat array {id, full version, sketch version, ...}: workers whose record says
-- `active` and whose heartbeat key exists (or which are included), in set order.
local include = {}
for i = 6, #ARGV do include[ARGV[i]] = true end
local every = ARGV[5] == '1'
local out = {}
for _, wid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. wid
  if every or (redis.call('HGET', key, 'status') == 'active'
      and (include[wid] or redis.call('EXISTS', key .. ARGV[2]) == 1)) then
    out[#out + 1] = wid
    out[#out + 1] = tonumber(redis.call('HGET', key .. ARGV[3], 'version') or '0')
    local sketch = 0
    if ARGV[4] ~= '' then
      sketch = tonumber(redis.call('HGET', key .. ARGV[4], 'version') or '0')
    end
    out[#out + 1] = sketch
  end
end
return out
