-- ARGV: id, token, now: hand a running job back; its attempt does not count
local id, now = ARGV[1], tonumber(ARGV[3])
local f = redis.call('HMGET', jk(id), 'status', 'queue', 'token', 'attempts')
if f[1] ~= 'running' or f[3] ~= ARGV[2] then return 0 end
redis.call('ZREM', ns .. ':leases', id)
local attempts = tonumber(f[4]) - 1
if attempts < 0 then attempts = 0 end
redis.call('HSET', jk(id), 'eta', now, 'worker', '', 'attempts', attempts)
redis.call('HINCRBY', jk(id), 'token', 1)
push(id, f[2], 'running', now)
return 1
