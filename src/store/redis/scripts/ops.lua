-- The operations of acquire.lua, release.lua, renew.lua and giveback.lua,
-- as functions, so that a single operation (those scripts) and a batch of
-- them (batch.lua) run the same code. Prepended after grant.lua at build
-- time (`with_ops!` in src/store/redis/call.rs). Every operation is
-- idempotent: fred resends a command once after a dropped connection, and
-- a resend must answer what the first run did.

-- Take a lock if it is free. Idempotent for the same token (a resent
-- command). A different token with the same request id is a replay (a
-- retried Acquire whose reply was lost): it gets the same lease, which is
-- marked 'rep' so that no cleanup of the first attempt gives it back.
-- min_replicas: '0', or --min-replica-acks (the caller WAITs after this).
-- mark: '0', or for an Acquire that waits, how long (ms) it keeps new
-- shared holders out once it found the lock held (shared.lua).
-- Reply: {1, token, fence, ttl_ms, pttl_ms} granted (or already ours),
--        {0, pttl} held, {2, online} not granted: fewer than min_replicas
--        replicas online.
local function acquire(lock, counter, token, ttl, owner, meta, rid, counter_ttl, min_replicas, mark)
  local cur = redis.call('HMGET', lock, 'token', 'rid', 'fence', 'ttl', 'rep')
  local held = cur[1] and cur[3]
  local same = held and cur[1] == token
  local replay = held and not same and rid ~= '' and cur[2] == rid
  if held and not same and not replay then
    if mark ~= '0' then
      shared_ops().mark(lock, token, mark)
    end
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
  if held then
    if replay and not cur[5] then
      redis.call('HSET', lock, 'rep', '1')
    elseif min_replicas > 0 then
      -- A write that changes nothing, so that the caller's WAIT covers this
      -- lease even if another connection granted it.
      redis.call('HSET', lock, 'token', cur[1])
    end
    return {1, cur[1], tonumber(cur[3]), tonumber(cur[4]), redis.call('PTTL', lock)}
  end
  -- Not held, but a record released by an earlier version keeps the token.
  local released = (cur[1] and not cur[3]) and cur[1] or nil
  local fence = grant(lock, counter, token, ttl, owner, meta, rid, counter_ttl, released, cur[4])
  if mark ~= '0' then
    redis.call('ZREM', lock .. ':xw', token)
  end
  return {1, token, fence, tonumber(ttl), tonumber(ttl)}
end

-- Release the lock if the token holds it, and tell waiting servers.
-- att: '' for the holder's own Release; a stream's attachment id for the
-- release at that stream's end, which applies only if that stream is the
-- lock's latest attachment. giveback: the cleanup of a grant whose reply
-- may not have reached its caller, which never releases a lease that a
-- request_id replay handed out (that replay may have been delivered).
-- gone: this token's tombstone key (`<lock>:gone:<token>`).
-- Reply: the released grant's fencing token (the message carries it too,
-- so the server that released can tell its own release when it comes
-- back), -1 if this token was released already (a resent or retried
-- release), 0 if the token does not hold the lock or the condition failed.
local function release(lock, token, channel, att, giveback, gone)
  local cur = redis.call('HMGET', lock, 'token', 'fence', 'rep', 'att', 'meta')
  if cur[1] == token and cur[2] then
    if giveback and cur[3] then
      return 0
    end
    if att ~= '' and cur[4] ~= att then
      return 0
    end
    entomb(lock, gone, cur[5])
    redis.call('SPUBLISH', channel, cur[2])
    return tonumber(cur[2])
  end
  if cur[1] == '' then
    return shared_ops().release(lock, token, channel, att, giveback, gone)
  end
  if cur[1] == token or redis.call('EXISTS', gone) == 1 then
    return -1
  end
  return 0
end

-- Extend the lock if the token holds it; ttl '0' keeps the TTL granted.
-- att: the KeepAlive stream this renewal came through ('' for a unary
-- Renew), recorded as the lock's latest attachment.
-- Reply: the TTL now in force, or -1 when the lock is lost.
local function renew(lock, token, ttl, att)
  local cur = redis.call('HMGET', lock, 'token', 'ttl', 'fence', 'att')
  if cur[1] ~= token or not cur[3] then
    if cur[1] == '' then
      return shared_ops().renew(lock, token, ttl, att)
    end
    return -1
  end
  if ttl == '0' then
    ttl = cur[2]
  else
    redis.call('HSET', lock, 'ttl', ttl)
  end
  if att ~= '' and cur[4] ~= att then
    redis.call('HSET', lock, 'att', att)
  end
  redis.call('PEXPIRE', lock, ttl)
  return tonumber(ttl)
end
