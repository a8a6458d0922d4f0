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
-- fence = max(counter + 1, TIME in microseconds): strictly increasing even
-- when the counter key was evicted or lost in a failover (DESIGN §2).
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local fence = redis.call('INCR', KEYS[2])
if fence < now_us then
  fence = now_us
  redis.call('SET', KEYS[2], string.format('%d', fence), 'PX', ARGV[6])
else
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'fence', string.format('%d', fence),
  'ttl', ARGV[2], 'owner', ARGV[3], 'meta', ARGV[4], 'rid', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, ARGV[1], fence, tonumber(ARGV[2])}
