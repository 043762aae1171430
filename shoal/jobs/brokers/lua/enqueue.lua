-- ARGV: id, name, queue, priority, eta, max_attempts, key, parents (comma-separated), message, now,
-- result_ttl, key_until, key_expires, limit_key, rate, max_concurrency ('' = unset)
local now = tonumber(ARGV[10])
expire_some(now)
local out, unknown = enqueue_one(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7],
  ARGV[8], ARGV[9], now, {ARGV[11], ARGV[12], ARGV[13], ARGV[14], ARGV[15], ARGV[16]})
if not out then return redis.error_reply('unknown parent job ' .. unknown) end
return out
