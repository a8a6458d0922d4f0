-- Extend the lock if the token holds it.
-- KEYS[1] lock hash; ARGV: token, ttl_ms ('0' keeps the TTL granted)
-- Reply: the TTL now in force, or -1 when the lock is lost.
local cur = redis.call('HMGET', KEYS[1], 'token', 'ttl')
if cur[1] ~= ARGV[1] then
  return -1
end
local ttl = ARGV[2]
if ttl == '0' then
  ttl = cur[2]
else
  redis.call('HSET', KEYS[1], 'ttl', ttl)
end
redis.call('PEXPIRE', KEYS[1], ttl)
return tonumber(ttl)
