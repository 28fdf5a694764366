-- An ack releases its decision's claim on the partner snapshot it named (commit.lua's pin).
-- KEYS: 1 the pin (`Keys.pin`), 2 the partner's snapshot meta hash, 3.. the pinned frame's
--       segment keys, in order (every key shares the federation's hash tag: one slot)
-- ARGV: 1 the decision id
-- While the pinned frame is still the partner's latest, its segments stay (they are the
-- snapshot). Once superseded, a segment no other unacked decision's layer lies in is unlinked
-- now rather than when the pin expires. The pin hash itself stays until its TTL (metadata only:
-- it lets a late read say why the layer is gone). Returns 1 when a claim was released, else 0.
if redis.call('HDEL', KEYS[1], 'd:' .. ARGV[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[2], 'tag') == redis.call('HGET', KEYS[1], 'tag') then return 1 end
local keep, fields = {}, redis.call('HGETALL', KEYS[1])
for j = 1, #fields, 2 do
  if string.sub(fields[j], 1, 2) == 'd:' then
    local where = cjson.decode(redis.call('HGET', KEYS[1], 'L:' .. fields[j + 1]))
    for s = where.lo, where.hi do keep[s] = true end
  end
end
for i = 3, #KEYS do
  if not keep[i - 3] then redis.call('UNLINK', KEYS[i]) end
end
return 1
