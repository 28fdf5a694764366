-- Accept a sketch publish atomically: the worker's latest sketch frame and its bookkeeping.
-- KEYS: 1 worker hash, 2 sketch hash, 3 alive key, 4 federation hash (one hash tag: one slot)
-- ARGV: 1 step, 2 epoch, 3 loss|'', 4 grad_norm|'', 5 SnapshotMeta JSON, 6 now (ISO),
--       7 heartbeat ttl ms, 8 the frame
-- Sketch and full publishes share the worker's `version` counter, so a scoring entry names
-- whichever is newest (the caller queues it, outside the federation's slot). Returns
-- {version, full requested (0|1)}; -2 when the federation or the worker was deleted meanwhile
-- (nothing written).
if redis.call('EXISTS', KEYS[4]) == 0 or redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
local prev = redis.call('HGET', KEYS[1], 'loss')
redis.call('HSET', KEYS[2], 'version', version, 'step', ARGV[1], 'epoch', ARGV[2],
  'loss', ARGV[3], 'prev_loss', prev or '', 'meta', ARGV[5], 'published_at', ARGV[6],
  'frame', ARGV[8])
redis.call('HSET', KEYS[1], 'step', ARGV[1], 'epoch', ARGV[2], 'loss', ARGV[3],
  'grad_norm', ARGV[4], 'last_seen', ARGV[6])
local wanted = redis.call('HDEL', KEYS[1], 'full_wanted')
redis.call('SET', KEYS[3], '1', 'PX', ARGV[7])
return {version, wanted}
