-- ARGV: id, now
local id, now = ARGV[1], tonumber(ARGV[2])
local f = redis.call('HMGET', jk(id), 'status', 'queue', 'name')
if f[1] ~= 'waiting' and f[1] ~= 'queued' and f[1] ~= 'scheduled' then return 0 end
redis.call('ZREM', ns .. ':ready:' .. f[2], id)
redis.call('ZREM', ns .. ':delayed', id)
finish(id, f[2], f[1], 'cancelled', now)
finish_children(id, 'cancelled', 'ParentCancelled: parent job ' .. id .. ' (' .. f[3] .. ') was cancelled', now)
return 1
