-- Accept a publish atomically: make its uploaded segments the worker's snapshot.
-- KEYS: 1 worker hash, 2 snapshot meta hash, 3 alive key, 4 federation hash,
--       5 the frame stored whole by versions before segments (unlinked if present),
--       6 the pin of the previous snapshot's version (`Keys.pin`: a decision names it),
--       then the upload's ARGV[9] segments, then the previous snapshot's segments
-- ARGV: 1 step, 2 epoch, 3 loss|'', 4 grad_norm|'', 5 SnapshotMeta JSON, 6 now (ISO),
--       7 heartbeat ttl ms, 8 upload tag, 9 upload segment count, 10 previous tag|''
-- Every key is declared and shares the federation's hash tag (Redis Cluster: one slot). The
-- caller WATCHes the meta hash, so the previous segments it names are the ones stored. The
-- upload's segments were written with a TTL before this runs; here they lose it and the previous
-- snapshot's are unlinked, but for those holding a layer an unacked decision names (the pin
-- records which, see commit.lua: they expire with the pin), so readers see either the old frame
-- or the new.
-- Returns the new version; the current one when this upload is the snapshot already (a retry of
-- a call whose reply was lost: nothing is written twice); -2 when the federation or worker was
-- deleted meanwhile (the caller removes what the upload wrote); -3 when a segment expired
-- before the commit (nothing changed).
if redis.call('EXISTS', KEYS[4]) == 0 or redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
local tag, count = ARGV[8], tonumber(ARGV[9])
local old = redis.call('HMGET', KEYS[2], 'tag', 'loss', 'version')
if old[1] == tag then return tonumber(old[3]) end
for i = 7, 6 + count do
  if redis.call('EXISTS', KEYS[i]) == 0 then return -3 end
end
for i = 7, 6 + count do redis.call('PERSIST', KEYS[i]) end
if ARGV[10] ~= '' and ARGV[10] ~= tag then
  -- Keep only the segments holding a layer some unacked decision names (they expire with the
  -- pin, or go when the last decision needing them is acked); unlink the rest now.
  local pinned, keep = redis.call('PTTL', KEYS[6]), {}
  if pinned > 0 then
    local fields = redis.call('HGETALL', KEYS[6])
    for j = 1, #fields, 2 do
      if string.sub(fields[j], 1, 2) == 'd:' then
        local where = cjson.decode(redis.call('HGET', KEYS[6], 'L:' .. fields[j + 1]))
        for s = where.lo, where.hi do keep[s] = true end
      end
    end
  end
  for i = 7 + count, #KEYS do
    if keep[i - 7 - count] then
      redis.call('PEXPIRE', KEYS[i], pinned)
    else
      redis.call('UNLINK', KEYS[i])
    end
  end
end
redis.call('UNLINK', KEYS[5])
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'version', version, 'step', ARGV[1], 'epoch', ARGV[2],
  'loss', ARGV[3], 'prev_loss', old[2] or '', 'meta', ARGV[5], 'published_at', ARGV[6],
  'tag', tag, 'segments', count)
redis.call('HSET', KEYS[1], 'step', ARGV[1], 'epoch', ARGV[2], 'loss', ARGV[3],
  'grad_norm', ARGV[4], 'last_seen', ARGV[6])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[7])
return version
