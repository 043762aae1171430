-- ARGV: id, token, error, traceback, exception, retry_at ('' = no retry), now
local id, now = ARGV[1], tonumber(ARGV[7])
local f = redis.call('HMGET', jk(id), 'status', 'queue', 'token')
if f[1] ~= 'running' or f[3] ~= ARGV[2] then return 0 end
if ARGV[6] == '' then
  fail_dead(id, f[2], 'running', ARGV[3], ARGV[4], ARGV[5], now)
else
  redis.call('ZREM', ns .. ':leases', id)
  redis.call('HSET', jk(id), 'eta', ARGV[6], 'worker', '', 'last_error', ARGV[3], 'traceback', ARGV[4])
  redis.call('HINCRBY', jk(id), 'token', 1)
  push(id, f[2], 'running', now)
end
return 1
