-- One SHARED Acquire (see `acquire_shared` in shared.lua).
-- KEYS[1] lock hash, KEYS[2] fencing counter (same hash slot)
-- ARGV: token, ttl_ms, owner, metadata, request_id, counter_ttl_ms,
--       shared_limit
return shared_ops().acquire(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
