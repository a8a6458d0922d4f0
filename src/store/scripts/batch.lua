-- Several operations in one script call, each with its own reply, in
-- order: what concurrent Acquires, Releases and renewals on one single-node
-- (or Sentinel) Redis share when they queue behind each other, so that a
-- busy server pays one round trip, one write and one script call for many.
-- Each operation is the same function as its own script (ops.lua), so each
-- is exactly as atomic as alone; the batch as a whole is atomic too.
-- Never used on a Redis Cluster: the keys of one script must share a slot.
-- ARGV: per operation its letter, then its arguments; KEYS in the same order:
--   'A' token ttl owner meta rid counter_ttl    KEYS: lock, counter
--   'R' token channel                            KEYS: lock
--   'N' token ttl                                KEYS: lock
-- Reply: one reply per operation, as its own script would give it.
local out, k, a = {}, 1, 1
while a <= #ARGV do
  local op = ARGV[a]
  if op == 'A' then
    out[#out + 1] = acquire(KEYS[k], KEYS[k + 1], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3],
      ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], '0')
    k, a = k + 2, a + 7
  elseif op == 'R' then
    out[#out + 1] = release(KEYS[k], ARGV[a + 1], ARGV[a + 2])
    k, a = k + 1, a + 3
  elseif op == 'N' then
    out[#out + 1] = renew(KEYS[k], ARGV[a + 1], ARGV[a + 2])
    k, a = k + 1, a + 3
  else
    return redis.error_reply('ERR leasehold batch: unknown operation ' .. tostring(op))
  end
end
return out
