-- Who holds the lock, without its token.
-- KEYS[1] lock hash
-- Reply: {0} free, or {1, owner, fence, pttl, metadata}.
local cur = redis.call('HMGET', KEYS[1], 'owner', 'fence', 'meta')
if not cur[2] then
  return {0}
end
return {1, cur[1], tonumber(cur[2]), redis.call('PTTL', KEYS[1]), cur[3]}
