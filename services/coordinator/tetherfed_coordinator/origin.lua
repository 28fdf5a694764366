-- Keep a worker's origin (`Keys.origin`): a copy of its snapshot as it is now, meta hash and
-- frame segments, unless it has one already. Written once: every later call, from any
-- coordinator replica, leaves the first copy as it is.
-- KEYS: 1 snapshot meta hash, 2 origin hash, then the ARGV[2] segments of the snapshot, then
--       as many origin segment keys (`Keys.origin_segment`, same order)
-- ARGV: 1 the upload tag the snapshot must have, 2 its segment count
-- Every key shares the federation's hash tag (Redis Cluster: one slot). Queued in a publish's
-- transaction after publish.lua, it copies that publish's frame, or nothing when the publish did
-- not commit (the meta hash names another tag).
-- Returns 1 when it wrote the origin, 0 when the worker has one or the snapshot is not the one
-- named.
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('HGET', KEYS[1], 'tag') ~= ARGV[1] then return 0 end
local count = tonumber(ARGV[2])
for i = 3, 2 + count do
  if redis.call('EXISTS', KEYS[i]) == 0 then return 0 end
end
for i = 3, 2 + count do
  redis.call('COPY', KEYS[i], KEYS[i + count], 'REPLACE')
  redis.call('PERSIST', KEYS[i + count])
end
redis.call('COPY', KEYS[1], KEYS[2])
redis.call('PERSIST', KEYS[2])
return 1
