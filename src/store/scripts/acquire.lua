-- Take a lock if it is free. Idempotent for the same token (a retried send)
-- and for the same request id (a retried Acquire whose reply was lost).
-- KEYS[1] lock hash, KEYS[2] fencing counter (same hash slot)
-- ARGV: token, ttl_ms, owner, metadata, request_id, counter_ttl_ms,
--       min_replicas (0, or --min-replica-acks: the caller WAITs after this)
-- Reply: {1, token, fence, ttl_ms} granted (or already ours), {0, pttl} held,
--        {2, online} not granted: fewer than min_replicas replicas online.
local cur = redis.call('HMGET', KEYS[1], 'token', 'rid', 'fence', 'ttl')
local mine = cur[1] and (cur[1] == ARGV[1] or (ARGV[5] ~= '' and cur[2] == ARGV[5]))
if cur[1] and not mine then
  return {0, redis.call('PTTL', KEYS[1])}
end
local min_replicas = tonumber(ARGV[7]) or 0
if min_replicas > 0 then
  -- A grant no WAIT could confirm is not made at all: no replica-less
  -- primary (just promoted, say) holds a connection in WAIT for nothing.
  local _, online = string.gsub(redis.call('INFO', 'replication'), 'state=online', '')
  if online < min_replicas then
    return {2, online}
  end
end
if mine then
  if min_replicas > 0 then
    -- A write that changes nothing, so that the caller's WAIT covers this
    -- lease even if another connection granted it.
    redis.call('HSET', KEYS[1], 'token', cur[1])
  end
  return {1, cur[1], tonumber(cur[3]), tonumber(cur[4])}
end
local fence = grant(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
return {1, ARGV[1], fence, tonumber(ARGV[2])}
