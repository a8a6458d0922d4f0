-- ForceRelease: take the lock from its holder whatever its token, and tell
-- waiting servers as a release does.
-- KEYS[1] lock hash; ARGV[1] release channel
-- The token goes too (unlike a release, which keeps it as a tombstone), so
-- the holder's own Release answers false and its renewals find the lock
-- lost. The fencing counter stays: the next grant is fenced higher.
-- The message is the removed grant's fencing token, negated: waiters wake
-- as for a release, and a watcher can tell a forced release from one.
-- Reply: the removed grant's fencing token, or 0 if nobody held the lock.
local fence = redis.call('HGET', KEYS[1], 'fence')
if not fence then
  return 0
end
redis.call('HDEL', KEYS[1], 'token', 'fence', 'rep', 'att')
redis.call('SPUBLISH', ARGV[1], '-' .. fence)
return tonumber(fence)
