-- ARGV: now, lease, worker, limit, queue... -> {id, token, attempts, message, ...}
local now, lease, worker, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
expire_some(now)
-- Lapsed leases: queue again, or dead-letter when no attempt is left.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', ns .. ':leases', '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', ns .. ':leases', id)
  local f = redis.call('HMGET', jk(id), 'status', 'queue', 'attempts', 'max_attempts', 'worker')
  if f[1] == 'running' then
    local error = 'WorkerLost: worker ' .. f[5] .. ' stopped renewing its lease (attempt ' .. f[3] .. ')'
    if tonumber(f[3]) >= tonumber(f[4]) then
      fail_dead(id, f[2], 'running', error, '', '', now)
    else
      redis.call('HSET', jk(id), 'eta', now, 'worker', '', 'last_error', error)
      redis.call('HINCRBY', jk(id), 'token', 1)
      push(id, f[2], 'running', now)
    end
  end
end
-- Delayed jobs whose time has come.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', ns .. ':delayed', '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', ns .. ':delayed', id)
  local f = redis.call('HMGET', jk(id), 'status', 'queue')
  if f[1] == 'scheduled' then push(id, f[2], 'scheduled', now) end
end
local out = {}
local taken, held_back = 0, 0
while taken < limit and held_back < 100 do
  local best, best_score, best_queue = nil, nil, nil
  for i = 5, #ARGV do
    local head = redis.call('ZRANGE', ns .. ':ready:' .. ARGV[i], 0, 0, 'WITHSCORES')
    if head[1] and (not best_score or tonumber(head[2]) < best_score) then
      best, best_score, best_queue = head[1], tonumber(head[2]), ARGV[i]
    end
  end
  if not best then break end
  redis.call('ZREM', ns .. ':ready:' .. best_queue, best)
  local wait = limited(best, now)
  if wait then  -- over its limit: it waits, others go ahead
    redis.call('HSET', jk(best), 'eta', wait)
    redis.call('ZADD', ns .. ':delayed', wait, best)
    set_status(best, best_queue, 'queued', 'scheduled')
    held_back = held_back + 1
  else
  local k = jk(best)
  local token = redis.call('HINCRBY', k, 'token', 1)
  local attempts = redis.call('HINCRBY', k, 'attempts', 1)
  redis.call('HSET', k, 'worker', worker, 'lease', now + lease, 'started', now)
  set_status(best, best_queue, 'queued', 'running')
  redis.call('ZADD', ns .. ':leases', now + lease, best)
  table.insert(out, best)
  table.insert(out, token)
  table.insert(out, attempts)
  table.insert(out, redis.call('GET', mk(best)) or redis.call('HGET', k, 'message'))  -- (older jobs)
  taken = taken + 1
  end
end
return out
