-- Shared by acquire.lua and handoff.lua: prepended to each at build time
-- (src/store/redis.rs), so the two ways of granting cannot drift apart.
--
-- A lock record is HELD while it has a 'fence' field. Released, it keeps
-- only its 'token' (a tombstone) until the TTL it had left runs out, and the
-- next grant moves that token to 'gone': so a Release resent or retried
-- after a lost reply still answers true (documentation/semantics.md).
--
-- Gives the lock record `lock` to `token` with a fencing token of
-- max(counter + 1, TIME in microseconds): strictly increasing even when the
-- counter key was evicted or lost in a failover. The counter outlives the
-- lock and expires `counter_ttl` ms after its last grant. `gone` is the
-- token of the release this grant follows ('' if none is known).
local function grant(lock, counter, token, ttl, owner, meta, rid, counter_ttl, gone)
  local t = redis.call('TIME')
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local fence = redis.call('INCR', counter)
  if fence < now_us then
    fence = now_us
    redis.call('SET', counter, string.format('%d', fence), 'PX', counter_ttl)
  else
    redis.call('PEXPIRE', counter, counter_ttl)
  end
  redis.call('HSET', lock, 'token', token, 'fence', string.format('%d', fence),
    'ttl', ttl, 'owner', owner, 'meta', meta, 'rid', rid, 'gone', gone or '')
  redis.call('PEXPIRE', lock, ttl)
  return fence
end
