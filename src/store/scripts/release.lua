-- Delete the lock if the token holds it, and tell waiting servers.
-- KEYS[1] lock hash; ARGV: token, release channel (same hash slot)
-- Reply: the released grant's fencing token, or 0 if the token does not
-- hold the lock. The message carries the same fencing token, so the
-- server that released can tell its own release when it comes back.
local cur = redis.call('HMGET', KEYS[1], 'token', 'fence')
if cur[1] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SPUBLISH', ARGV[2], cur[2])
  return tonumber(cur[2])
end
return 0
