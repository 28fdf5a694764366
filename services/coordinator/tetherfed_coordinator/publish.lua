-- Accept a publish atomically (runs inside the MULTI that SETs the frame bytes).
-- KEYS: 1 worker hash, 2 snapshot meta hash, 3 scoring stream, 4 alive key, 5 federation hash
-- Returns the new version, or -2 when the federation was deleted meanwhile (the caller then
-- removes the frame the same transaction stored).
-- ARGV: 1 fed, 2 worker, 3 step, 4 epoch, 5 loss|'', 6 grad_norm|'', 7 SnapshotMeta JSON,
--       8 now (ISO), 9 heartbeat ttl ms, 10 stream maxlen
if redis.call('EXISTS', KEYS[5]) == 0 or redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
local prev = redis.call('HGET', KEYS[2], 'loss') or ''
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'version', version, 'step', ARGV[3], 'epoch', ARGV[4],
  'loss', ARGV[5], 'prev_loss', prev, 'meta', ARGV[7], 'published_at', ARGV[8])
redis.call('HSET', KEYS[1], 'step', ARGV[3], 'epoch', ARGV[4], 'loss', ARGV[5],
  'grad_norm', ARGV[6], 'last_seen', ARGV[8])
redis.call('SET', KEYS[4], '1', 'PX', ARGV[9])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[10], '*',
  'fed', ARGV[1], 'worker', ARGV[2], 'version', version)
return version
