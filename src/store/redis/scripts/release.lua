-- One Release (see `release` in ops.lua).
-- KEYS[1] lock hash, KEYS[2] the token's tombstone (same hash slot);
-- ARGV: token, release channel, attachment ('' unless a stream's end)
return release(KEYS[1], ARGV[1], ARGV[2], ARGV[3], false, KEYS[2])
