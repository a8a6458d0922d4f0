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
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local fence = redis.call('INCR', KEYS[2])
if fence < now_us then
  fence = now_us
  redis.call('SET', KEYS[2], string.format('%d', fence), 'PX', ARGV[7])
else
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
end
redis.call('HSET', KEYS[1], 'token', ARGV[2], 'fence', string.format('%d', fence),
  'ttl', ARGV[3], 'owner', ARGV[4], 'meta', ARGV[5], 'rid', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, tonumber(cur[2]), fence, tonumber(ARGV[3])}
