-- Shared holders (documentation/redis.md). Prepended after grant.lua and
-- before ops.lua, whose release and renew fall back to these functions when
-- the record is shared. They are made by one function, `shared_ops()`,
-- called only on a shared path: every script run defines its prelude's
-- functions anew, and the exclusive path should pay for one definition
-- here, not eight (about 0.4 us of Redis time per call).
--
-- A lock held in SHARED mode is the same record, marked so that the
-- exclusive scripts see it as held by a token no client can present:
--   token ''            (never a client's token: an empty one is refused)
--   fence               the latest shared grant's fencing token (so the
--                       record is HELD for every exclusive script)
--   limit               shared_limit, set by the first holder
--   h:<token>           each holder, JSON: fence, ttl, owner, meta, rid,
--                       att (latest KeepAlive stream), rep (replayed)
--   r:<request id>      the holder token a request id produced
-- and `<lock>:exp`, a sorted set of holder tokens by expiry (ms since the
-- epoch, Redis TIME), pruned inside each script (Redis 7.0 has no
-- per-field expiry). Record and set expire with the latest holder, so
-- while the record exists some holder is live, and an exclusive Acquire
-- that finds it is told to wait until then: the exclusive scripts need no
-- read beyond the one they always made.
--
-- `<lock>:xw`, a sorted set of the tokens of EXCLUSIVE Acquires that wait
-- (scored by when their mark lapses), keeps new shared holders out while a
-- writer waits, whichever server it waits on: no writer starvation.

local function shared_ops()
  local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end

  -- Gives the record and its expiry set the expiry of the latest holder, or
  -- deletes both when no holder is left. Returns how many holders are left.
  local function shared_expire(lock, exp)
    local last = redis.call('ZRANGE', exp, -1, -1, 'WITHSCORES')
    if not last[2] then
      redis.call('DEL', lock, exp)
      return 0
    end
    redis.call('PEXPIREAT', lock, last[2])
    redis.call('PEXPIREAT', exp, last[2])
    return redis.call('ZCARD', exp)
  end

  -- Drops the holders whose lease ran out by `now`, then as shared_expire.
  local function shared_prune(lock, exp, now)
    local gone = redis.call('ZRANGEBYSCORE', exp, '-inf', now)
    for _, tok in ipairs(gone) do
      local raw = redis.call('HGET', lock, 'h:' .. tok)
      if raw then
        local h = cjson.decode(raw)
        if h.rid ~= '' then
          redis.call('HDEL', lock, 'r:' .. h.rid)
        end
        redis.call('HDEL', lock, 'h:' .. tok)
      end
    end
    if #gone > 0 then
      redis.call('ZREMRANGEBYSCORE', exp, '-inf', now)
    end
    return shared_expire(lock, exp)
  end

  -- When the last mark of a waiting EXCLUSIVE Acquire lapses (ms since the
  -- epoch), or nil if none waits.
  local function exclusive_waiting(xw, now)
    redis.call('ZREMRANGEBYSCORE', xw, '-inf', now)
    local last = redis.call('ZRANGE', xw, -1, -1, 'WITHSCORES')
    return tonumber(last[2])
  end

  -- A waiting EXCLUSIVE Acquire that found the lock held: new shared
  -- holders stay out for `mark` ms (renewed by its next attempt).
  local function mark_exclusive(lock, token, mark)
    local xw = lock .. ':xw'
    redis.call('ZADD', xw, now_ms() + tonumber(mark), token)
    redis.call('PEXPIRE', xw, mark)
  end

  -- Take a shared hold if the lock is free or held shared with room left
  -- and no exclusive Acquire waits. Idempotent for the same token; a
  -- different token with a holder's request id is a replay of that hold.
  -- Reply: {1, token, fence, ttl_ms, pttl_ms} granted (or already ours),
  --        {0, retry_after_ms} not now, {3, limit} the holders' limit differs.
  local function acquire_shared(lock, counter, token, ttl, owner, meta, rid, counter_ttl, limit)
    local cur = redis.call('HMGET', lock, 'token', 'fence', 'limit')
    if cur[2] and cur[1] ~= '' then
      return {0, redis.call('PTTL', lock)}
    end
    local exp, now, n = lock .. ':exp', now_ms(), 0
    if cur[1] == '' then
      n = shared_prune(lock, exp, now)
    end
    if n > 0 then
      local mine = token
      if rid ~= '' then
        mine = redis.call('HGET', lock, 'r:' .. rid) or token
      end
      local raw = redis.call('HGET', lock, 'h:' .. mine)
      if raw then
        local h = cjson.decode(raw)
        if mine ~= token and h.rep ~= '1' then
          h.rep = '1'
          redis.call('HSET', lock, 'h:' .. mine, cjson.encode(h))
        end
        local left = tonumber(redis.call('ZSCORE', exp, mine)) - now
        return {1, mine, tonumber(h.fence), tonumber(h.ttl), left}
      end
      if tonumber(cur[3]) ~= tonumber(limit) then
        return {3, tonumber(cur[3])}
      end
      if tonumber(limit) > 0 and n >= tonumber(limit) then
        local first = redis.call('ZRANGE', exp, 0, 0, 'WITHSCORES')
        return {0, tonumber(first[2]) - now}
      end
    end
    local lapses = exclusive_waiting(lock .. ':xw', now)
    if lapses then
      return {0, lapses - now}
    end
    if n == 0 then
      -- Free. A record released by an earlier version may keep its token.
      bury(lock, (cur[1] and cur[1] ~= '') and cur[1] or nil)
      redis.call('DEL', lock)
      redis.call('HSET', lock, 'token', '', 'limit', limit)
    end
    local _, fence = next_fence(counter, counter_ttl)
    redis.call('HSET', lock, 'fence', fence, 'h:' .. token, cjson.encode({
      fence = fence, ttl = ttl, owner = owner, meta = meta, rid = rid, att = '', rep = ''}))
    if rid ~= '' then
      redis.call('HSET', lock, 'r:' .. rid, token)
    end
    redis.call('ZADD', exp, now + tonumber(ttl), token)
    shared_expire(lock, exp)
    -- Watchers hear of a shared grant as of an exclusive one (grant.lua).
    redis.call('SPUBLISH', string.sub(lock, 1, -5) .. 'released', 'g' .. fence)
    return {1, token, tonumber(fence), tonumber(ttl), tonumber(ttl)}
  end

  -- `release` (ops.lua) on a shared record: the same arguments and replies.
  local function shared_release(lock, token, channel, att, giveback, gone)
    local raw = redis.call('HGET', lock, 'h:' .. token)
    if not raw then
      if redis.call('EXISTS', gone) == 1 then
        return -1
      end
      return 0
    end
    local exp, now = lock .. ':exp', now_ms()
    local h = cjson.decode(raw)
    local until_ms = tonumber(redis.call('ZSCORE', exp, token)) or 0
    if until_ms <= now then
      shared_prune(lock, exp, now)
      return 0
    end
    if (giveback and h.rep == '1') or (att ~= '' and h.att ~= att) then
      return 0
    end
    redis.call('HDEL', lock, 'h:' .. token)
    if h.rid ~= '' then
      redis.call('HDEL', lock, 'r:' .. h.rid)
    end
    redis.call('ZREM', exp, token)
    redis.pcall('SET', gone, '1', 'PX', until_ms - now)
    shared_prune(lock, exp, now)
    redis.call('SPUBLISH', channel, h.fence)
    return tonumber(h.fence)
  end

  -- `renew` (ops.lua) on a shared record: the same arguments and replies.
  local function shared_renew(lock, token, ttl, att)
    local raw = redis.call('HGET', lock, 'h:' .. token)
    if not raw then
      return -1
    end
    local exp, now = lock .. ':exp', now_ms()
    local until_ms = tonumber(redis.call('ZSCORE', exp, token)) or 0
    if until_ms <= now then
      shared_prune(lock, exp, now)
      return -1
    end
    local h = cjson.decode(raw)
    if ttl == '0' then
      ttl = h.ttl
    else
      h.ttl = ttl
    end
    if att ~= '' then
      h.att = att
    end
    redis.call('HSET', lock, 'h:' .. token, cjson.encode(h))
    redis.call('ZADD', exp, now + tonumber(ttl), token)
    shared_expire(lock, exp)
    return tonumber(ttl)
  end

  return {
    acquire = acquire_shared,
    release = shared_release,
    renew = shared_renew,
    mark = mark_exclusive,
  }
end
