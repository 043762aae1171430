-- ARGV: id, token, result, now -> 1 if this finished the job
local id, now = ARGV[1], tonumber(ARGV[4])
expire_some(now)
local f = redis.call('HMGET', jk(id), 'status', 'queue')
if not f[1] or f[1] == 'succeeded' or f[1] == 'failed' or f[1] == 'cancelled' then return 0 end
if f[1] == 'scheduled' then redis.call('ZREM', ns .. ':delayed', id) end
redis.call('ZREM', ns .. ':ready:' .. f[2], id)
finish(id, f[2], f[1], 'succeeded', now)
redis.call('HSET', jk(id), 'result', ARGV[3])
for _, child in ipairs(redis.call('SMEMBERS', ns .. ':children:' .. id)) do
  local c = redis.call('HMGET', jk(child), 'status', 'queue')
  if c[1] == 'waiting' then
    if redis.call('HINCRBY', jk(child), 'pending', -1) <= 0 then
      redis.call('ZREM', ns .. ':waiting', child)
      local eta = tonumber(redis.call('HGET', jk(child), 'eta'))
      if eta < now then redis.call('HSET', jk(child), 'eta', now) end
      push(child, c[2], 'waiting', now)
    end
  end
end
return 1
