-- Gives back a grant whose reply may not have reached its caller (see
-- `release` in ops.lua): never a lease a request_id replay handed out.
-- KEYS[1] lock hash, KEYS[2] the token's tombstone; ARGV: token, release
-- channel (same hash slot)
return release(KEYS[1], ARGV[1], ARGV[2], '', true, KEYS[2])
