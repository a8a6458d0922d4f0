-- ForceRelease: take the lock from its holder whatever its token, and tell
-- waiting servers as a release does.
-- KEYS[1] lock hash; ARGV[1] release channel
-- The token goes too (unlike a release, which leaves a tombstone), so
-- the holder's own Release answers false and its renewals find the lock
-- lost. The fencing counter stays: the next grant is fenced higher.
-- The message is the removed grant's fencing token, negated: waiters wake
-- as for a release, and a watcher can tell a forced release from one.
-- Reply: {the removed grant's fencing token (the latest, when shared), the
-- number of holders removed}, or {0, 0} if nobody held the lock.
local cur = redis.call('HMGET', KEYS[1], 'token', 'fence')
local fence = cur[2]
if not fence then
  return {0, 0}
end
local holders = 1
if cur[1] == '' then
  -- Held SHARED (shared.lua): every holder goes, with the record and its
  -- expiry set (same hash slot), so no holder's renewal finds its field.
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  holders = redis.call('ZCOUNT', KEYS[1] .. ':exp', now, '+inf')
  redis.call('DEL', KEYS[1], KEYS[1] .. ':exp')
else
  redis.call('HDEL', KEYS[1], 'token', 'fence', 'rep', 'att')
end
redis.call('SPUBLISH', ARGV[1], '-' .. fence)
return {tonumber(fence), holders}
