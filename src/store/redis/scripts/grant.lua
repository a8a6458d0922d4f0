-- Prepended, with shared.lua and ops.lua, to every script that writes a
-- lock (`with_ops!` in src/store/redis/call.rs), so that the ways of
-- granting cannot drift apart.
--
-- A lock record is HELD while it has a 'fence' field. A release renames
-- the record to its token's tombstone (`<lock>:gone:<token>`, same hash
-- slot), which keeps the TTL the lease had left: a Release resent or
-- retried after a lost reply finds it and still answers true, however
-- many grants come in between (documentation/semantics.md). Renaming moves
-- the record instead of writing a new key: of the ways measured to
-- remember a released token, the cheapest (documentation/benchmarks.md).
--
-- Records written by servers before that kept the released token in the
-- record itself (no 'fence'); a grant over such a record first gives the
-- token a tombstone of its own (`bury`), so a rolling upgrade keeps the
-- promise.

-- The record `lock`, just released, becomes the tombstone `gone` for the
-- TTL it had left. Its metadata (up to 4 KiB) does not go with it: a busy
-- key would otherwise hold one copy per release made within a TTL.
local function entomb(lock, gone, meta)
  if meta and meta ~= '' then
    redis.call('HDEL', lock, 'meta')
  end
  redis.call('RENAME', lock, gone)
end

-- The next fencing token of the lock whose counter is `counter`, as a
-- number and as the string the counter holds: max(counter + 1, TIME in
-- microseconds), strictly increasing even when the counter key was
-- evicted or lost in a failover. The counter outlives the lock and
-- expires `counter_ttl` ms after its last grant.
local function next_fence(counter, counter_ttl)
  local t = redis.call('TIME')
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  -- One write in the usual case, where the clock has passed the last fence
  -- (SET ... GET answers the old value; nil if the counter was gone).
  local now = string.format('%d', now_us)
  local last = tonumber(redis.call('SET', counter, now, 'PX', counter_ttl, 'GET'))
  if last and last >= now_us then
    local fence = last + 1
    local f = string.format('%d', fence)
    redis.call('SET', counter, f, 'PX', counter_ttl)
    return fence, f
  end
  return now_us, now
end

-- Gives the released token that a record written by an earlier version
-- keeps (if any) its tombstone key before a new grant overwrites the
-- record. It lives `ttl` ms, the TTL the released lease was given last
-- (its 'ttl' field): at least what was left of it, without a PTTL call.
-- Nil `ttl`: what is left of the record (PTTL).
local function bury(lock, released, ttl)
  if released then
    local left = tonumber(ttl) or redis.call('PTTL', lock)
    if left > 0 then
      -- Same hash slot as `lock` (the tag is the lock's); the name is built
      -- here because only this script knows the released token.
      redis.pcall('SET', lock .. ':gone:' .. released, '1', 'PX', left)
    end
  end
end

-- Gives the lock record `lock` to `token`, fenced by next_fence.
-- `released`: the token a record released by an earlier version still
-- keeps (nil if none), as the caller already read it, and `released_ttl`
-- its 'ttl' field.
local function grant(lock, counter, token, ttl, owner, meta, rid, counter_ttl, released,
    released_ttl)
  bury(lock, released, released_ttl)
  local fence, f = next_fence(counter, counter_ttl)
  redis.call('HSET', lock, 'token', token, 'fence', f,
    'ttl', ttl, 'owner', owner, 'meta', meta, 'rid', rid)
  redis.call('PEXPIRE', lock, ttl)
  -- Watchers on any server hear of the grant, on the lock's release
  -- channel (`...:lock` -> `...:released`); waiters skip a 'g' message.
  redis.call('SPUBLISH', string.sub(lock, 1, -5) .. 'released', 'g' .. f)
  return fence
end
