-- One Acquire (see `acquire` in ops.lua).
-- KEYS[1] lock hash, KEYS[2] fencing counter (same hash slot)
-- ARGV: token, ttl_ms, owner, metadata, request_id, counter_ttl_ms,
--       min_replicas, mark ('0', or how long a waiting Acquire that finds
--       the lock held keeps new shared holders out)
return acquire(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7],
  ARGV[8])
