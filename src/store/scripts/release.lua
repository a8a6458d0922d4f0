-- Delete the lock if the token holds it, and tell waiting servers.
-- KEYS[1] lock hash; ARGV: token, release channel (same hash slot)
-- Reply: 1 released, 0 the token does not hold the lock.
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SPUBLISH', ARGV[2], '1')
  return 1
end
return 0
