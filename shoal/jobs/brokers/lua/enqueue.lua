-- ARGV: id, name, queue, priority, eta, max_attempts, key, parents (comma-separated), message, now
local out, unknown = enqueue_one(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7],
  ARGV[8], ARGV[9], tonumber(ARGV[10]))
if not out then return redis.error_reply('unknown parent job ' .. unknown) end
return out
