-- The operations of acquire.lua, release.lua and renew.lua, as functions,
-- so that a single operation (those scripts) and a batch of them
-- (batch.lua) run the same code. Prepended after grant.lua at build time
-- (src/store/redis.rs).

-- Take a lock if it is free. Idempotent for the same token (a retried send)
-- and for the same request id (a retried Acquire whose reply was lost).
-- min_replicas: '0', or --min-replica-acks (the caller WAITs after this).
-- Reply: {1, token, fence, ttl_ms} granted (or already ours), {0, pttl} held,
--        {2, online} not granted: fewer than min_replicas replicas online.
local function acquire(lock, counter, token, ttl, owner, meta, rid, counter_ttl, min_replicas)
  local cur = redis.call('HMGET', lock, 'token', 'rid', 'fence', 'ttl')
  local mine = cur[1] and (cur[1] == token or (rid ~= '' and cur[2] == rid))
  if cur[1] and not mine then
    return {0, redis.call('PTTL', lock)}
  end
  min_replicas = tonumber(min_replicas) or 0
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
      redis.call('HSET', lock, 'token', cur[1])
    end
    return {1, cur[1], tonumber(cur[3]), tonumber(cur[4])}
  end
  local fence = grant(lock, counter, token, ttl, owner, meta, rid, counter_ttl)
  return {1, token, fence, tonumber(ttl)}
end

-- Delete the lock if the token holds it, and tell waiting servers.
-- Reply: the released grant's fencing token, or 0 if the token does not
-- hold the lock. The message carries the same fencing token, so the
-- server that released can tell its own release when it comes back.
local function release(lock, token, channel)
  local cur = redis.call('HMGET', lock, 'token', 'fence')
  if cur[1] == token then
    redis.call('DEL', lock)
    redis.call('SPUBLISH', channel, cur[2])
    return tonumber(cur[2])
  end
  return 0
end

-- Extend the lock if the token holds it; ttl '0' keeps the TTL granted.
-- Reply: the TTL now in force, or -1 when the lock is lost.
local function renew(lock, token, ttl)
  local cur = redis.call('HMGET', lock, 'token', 'ttl')
  if cur[1] ~= token then
    return -1
  end
  if ttl == '0' then
    ttl = cur[2]
  else
    redis.call('HSET', lock, 'ttl', ttl)
  end
  redis.call('PEXPIRE', lock, ttl)
  return tonumber(ttl)
end
