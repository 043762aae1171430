-- ARGV: id, now. Cancels a job that has not finished (waiting, scheduled, queued, or
-- running: its worker sees the status and stops it; its late ack/fail is refused).
local id, now = ARGV[1], tonumber(ARGV[2])
local f = redis.call('HMGET', jk(id), 'status', 'queue', 'name', 'worker', 'attempts')
if f[1] ~= 'waiting' and f[1] ~= 'queued' and f[1] ~= 'scheduled' and f[1] ~= 'running' then
  return 0
end
redis.call('ZREM', ns .. ':ready:' .. f[2], id)
redis.call('ZREM', ns .. ':delayed', id)
if f[1] == 'running' then
  redis.call('HSET', jk(id), 'last_error',
    'Cancelled: while running on worker ' .. f[4] .. ' (attempt ' .. f[5] .. ')')
end
finish(id, f[2], f[1], 'cancelled', now)
finish_children(id, 'cancelled', 'ParentCancelled: parent job ' .. id .. ' (' .. f[3] .. ') was cancelled', now)
return 1
