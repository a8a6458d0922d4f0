-- Release the lock if the token holds it and grant it, in the same step, to
-- a waiter on the calling server (a handoff: one round trip instead of a
-- release, a notification and an acquire). No release is published: the
-- lock never comes free.
-- KEYS[1] lock hash, KEYS[2] fencing counter (same hash slot)
-- ARGV: old token, then the waiter's: token, ttl_ms, owner, metadata,
--       request_id, counter_ttl_ms
-- Reply: {0} the old token does not hold the lock (nothing changed), or
--        {1, released fence, new fence, ttl_ms}.
local cur = redis.call('HMGET', KEYS[1], 'token', 'fence')
if cur[1] ~= ARGV[1] then
  return {0}
end
local fence = grant(KEYS[1], KEYS[2], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
return {1, tonumber(cur[2]), fence, tonumber(ARGV[3])}
