-- Release the lock if the token holds it and grant it, in the same step, to
-- a waiter on the calling server (a handoff: one round trip instead of a
-- release, a notification and an acquire). No release is published: the
-- lock never comes free.
-- KEYS[1] lock hash, KEYS[2] fencing counter, KEYS[3] the old token's
-- tombstone (same hash slot)
-- ARGV: old token, attachment ('' unless a stream's end; see `release`),
--       then the waiter's: token, ttl_ms, owner, metadata, request_id,
--       counter_ttl_ms; then the release channel (for a shared holder's
--       release, which hands nothing over)
-- Reply: {0} the old token does not hold the lock (nothing changed),
--        {3, r} the lock is held shared: the old token's release as
--        `release` answers it, nothing handed over,
--        {2} the old token's release happened before (nothing changed),
--        {1, released fence, new fence, ttl_ms, pttl_ms} handed over
--        (released fence 0: a resent handoff that had already run).
local cur = redis.call('HMGET', KEYS[1], 'token', 'fence', 'att', 'meta')
if cur[1] == ARGV[3] and cur[2] then
  return {1, 0, tonumber(cur[2]), tonumber(ARGV[4]), redis.call('PTTL', KEYS[1])}
end
if cur[1] == '' then
  return {3, shared_ops().release(KEYS[1], ARGV[1], ARGV[9], ARGV[2], false, KEYS[3])}
end
if cur[1] ~= ARGV[1] or not cur[2] or (ARGV[2] ~= '' and cur[3] ~= ARGV[2]) then
  if (cur[1] == ARGV[1] and not cur[2]) or redis.call('EXISTS', KEYS[3]) == 1 then
    -- This token's release happened already (a retried Release): true,
    -- and nothing to hand over.
    return {2}
  end
  return {0}
end
-- The old token's record becomes its tombstone (KEYS[3]), and the waiter's
-- grant a new record.
entomb(KEYS[1], KEYS[3], cur[4])
local fence = grant(KEYS[1], KEYS[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
-- The waiter was an exclusive one that may have marked the key.
redis.call('ZREM', KEYS[1] .. ':xw', ARGV[3])
return {1, tonumber(cur[2]), fence, tonumber(ARGV[4]), tonumber(ARGV[4])}
