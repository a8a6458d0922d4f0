-- One Release (see `release` in ops.lua).
-- KEYS[1] lock hash; ARGV: token, release channel (same hash slot),
-- attachment ('' unless a stream's end)
return release(KEYS[1], ARGV[1], ARGV[2], ARGV[3], false)
