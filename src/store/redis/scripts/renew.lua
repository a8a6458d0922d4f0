-- One renewal (see `renew` in ops.lua).
-- KEYS[1] lock hash; ARGV: token, ttl_ms ('0' keeps the TTL granted),
-- attachment ('' for a unary Renew)
return renew(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
