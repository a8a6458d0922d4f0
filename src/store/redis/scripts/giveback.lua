-- Gives back a grant whose reply may not have reached its caller (see
-- `release` in ops.lua): never a lease a request_id replay handed out.
-- Also withdraws the token's exclusive-waiting mark (shared.lua), if any:
-- a waiting EXCLUSIVE Acquire that leaves without the lock gives its
-- token back, so that readers it held back go on at once.
-- KEYS[1] lock hash, KEYS[2] the token's tombstone; ARGV: token, release
-- channel (same hash slot)
local released = release(KEYS[1], ARGV[1], ARGV[2], '', true, KEYS[2])
redis.call('ZREM', KEYS[1] .. ':xw', ARGV[1])
return released
