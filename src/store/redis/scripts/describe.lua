-- Who holds the lock, without any token.
-- KEYS[1] lock hash
-- Reply: {0} free, {1, owner, fence, pttl, metadata} held exclusively,
--        {2, limit, then per live holder: owner, fence, pttl, metadata}
--        held shared (see shared.lua).
local cur = redis.call('HMGET', KEYS[1], 'owner', 'fence', 'meta', 'token', 'limit')
if not cur[2] then
  return {0}
end
if cur[4] ~= '' then
  return {1, cur[1], tonumber(cur[2]), redis.call('PTTL', KEYS[1]), cur[3]}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1] .. ':exp', '(' .. now, '+inf', 'WITHSCORES')
local out = {2, tonumber(cur[5])}
for i = 1, #live, 2 do
  local raw = redis.call('HGET', KEYS[1], 'h:' .. live[i])
  if raw then
    local h = cjson.decode(raw)
    out[#out + 1] = h.owner
    out[#out + 1] = tonumber(h.fence)
    out[#out + 1] = tonumber(live[i + 1]) - now
    out[#out + 1] = h.meta
  end
end
return out
