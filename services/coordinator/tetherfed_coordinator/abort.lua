-- Remove the segments of an upload that did not become the snapshot.
-- KEYS: 1 snapshot meta hash, 2.. the upload's segment keys; ARGV: 1 the upload's tag
-- A publish whose commit ran but whose reply was lost (connection drop, cancellation) must keep
-- its segments: the meta hash then names its tag, and nothing is removed.
if redis.call('HGET', KEYS[1], 'tag') == ARGV[1] then return 0 end
for i = 2, #KEYS do redis.call('UNLINK', KEYS[i]) end
return #KEYS - 1
