-- Several operations in one script call, each with its own reply, in
-- order: what concurrent Acquires, Releases and renewals on one single-node
-- (or Sentinel) Redis share when they queue behind each other, so that a
-- busy server pays one round trip, one write and one script call for many.
-- Each operation is the same function as its own script (ops.lua), run
-- under pcall: one that fails (OOM under noeviction, say) answers its own
-- caller {-9, message} and the others keep their own replies, so that no
-- caller is told "error" about an operation that took effect.
-- Never used on a Redis Cluster: the keys of one script must share a slot.
-- ARGV: per operation its letter, then its arguments; KEYS in the same order:
--   'A' token ttl owner meta rid counter_ttl mark  KEYS: lock, counter
--   'R' token channel att                        KEYS: lock, tombstone
--   'N' token ttl att                            KEYS: lock
-- Reply: one reply per operation, as its own script would give it.
local function failed(e)
  if type(e) == 'table' and e.err then
    return {-9, e.err}
  end
  return {-9, tostring(e)}
end
local out, k, a = {}, 1, 1
while a <= #ARGV do
  local op = ARGV[a]
  local ok, r
  if op == 'A' then
    ok, r = pcall(acquire, KEYS[k], KEYS[k + 1], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3],
      ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], '0', ARGV[a + 7])
    k, a = k + 2, a + 8
  elseif op == 'R' then
    ok, r = pcall(release, KEYS[k], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], false, KEYS[k + 1])
    k, a = k + 2, a + 4
  elseif op == 'N' then
    ok, r = pcall(renew, KEYS[k], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
    k, a = k + 1, a + 4
  else
    return redis.error_reply('ERR leasehold batch: unknown operation ' .. tostring(op))
  end
  if ok then
    out[#out + 1] = r
  else
    out[#out + 1] = failed(r)
  end
end
return out
