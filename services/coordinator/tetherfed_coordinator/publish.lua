-- Accept a publish atomically: make its uploaded segments the worker's snapshot.
-- KEYS: 1 worker hash, 2 snapshot meta hash, 3 scoring stream, 4 alive key, 5 federation hash,
--       6 the frame stored whole by versions before segments (unlinked if present)
-- ARGV: 1 fed, 2 worker, 3 step, 4 epoch, 5 loss|'', 6 grad_norm|'', 7 SnapshotMeta JSON,
--       8 now (ISO), 9 heartbeat ttl ms, 10 stream maxlen,
--       11 segment key base, 12 upload tag, 13 segment count
-- The segments `<base><tag>:<i>` were written with a TTL before this runs; here they lose it and
-- the previous snapshot's segments are unlinked, so readers see either the old frame or the new.
-- Returns the new version; -2 when the federation or worker was deleted meanwhile (the caller
-- removes what the upload wrote); -3 when a segment expired before the commit (nothing changed).
if redis.call('EXISTS', KEYS[5]) == 0 or redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
local base, tag, count = ARGV[11], ARGV[12], tonumber(ARGV[13])
for i = 0, count - 1 do
  if redis.call('EXISTS', base .. tag .. ':' .. i) == 0 then return -3 end
end
for i = 0, count - 1 do redis.call('PERSIST', base .. tag .. ':' .. i) end
local old = redis.call('HMGET', KEYS[2], 'tag', 'segments', 'loss')
if old[1] and old[1] ~= tag then
  for i = 0, tonumber(old[2]) - 1 do redis.call('UNLINK', base .. old[1] .. ':' .. i) end
end
redis.call('UNLINK', KEYS[6])
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'version', version, 'step', ARGV[3], 'epoch', ARGV[4],
  'loss', ARGV[5], 'prev_loss', old[3] or '', 'meta', ARGV[7], 'published_at', ARGV[8],
  'tag', tag, 'segments', count)
redis.call('HSET', KEYS[1], 'step', ARGV[3], 'epoch', ARGV[4], 'loss', ARGV[5],
  'grad_norm', ARGV[6], 'last_seen', ARGV[8])
redis.call('SET', KEYS[4], '1', 'PX', ARGV[9])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[10], '*',
  'fed', ARGV[1], 'worker', ARGV[2], 'version', version)
return version
