-- Helpers every script starts with. KEYS[1] is the namespace, e.g. "{shoal.jobs}": all keys
-- share its hash tag. A job is the hash NS:job:ID; indexes are sorted sets of ids.
local ns = KEYS[1]
local function jk(id) return ns .. ':job:' .. id end
local function count(queue, status, d)
  redis.call('HINCRBY', ns .. ':counts', queue .. '|' .. status, d)
end
local function set_status(id, queue, old, new)
  if old ~= new then
    count(queue, old, -1)
    count(queue, new, 1)
    redis.call('HSET', jk(id), 'status', new)
  end
end
-- Queue job ID (not in any index now): ready now, or delayed until its eta.
local function push(id, queue, old, now)
  local f = redis.call('HMGET', jk(id), 'priority', 'eta')
  local eta = tonumber(f[2])
  if eta > now then
    redis.call('ZADD', ns .. ':delayed', eta, id)
    set_status(id, queue, old, 'scheduled')
  else
    local seq = redis.call('INCR', ns .. ':seq')
    redis.call('ZADD', ns .. ':ready:' .. queue, (1000 - tonumber(f[1])) * 1099511627776 + seq, id)
    redis.call('LPUSH', ns .. ':wake:' .. queue, 1)
    redis.call('LTRIM', ns .. ':wake:' .. queue, 0, 15)
    set_status(id, queue, old, 'queued')
  end
end
local function finish(id, queue, old, status, now)
  set_status(id, queue, old, status)
  redis.call('HSET', jk(id), 'finished', now, 'worker', '')
  redis.call('HINCRBY', jk(id), 'token', 1)
  redis.call('ZREM', ns .. ':leases', id)
  redis.call('ZREM', ns .. ':waiting', id)
  redis.call('ZADD', ns .. ':finished', now, id)
end
-- Fail (or cancel) the waiting descendants of ID, each naming its parent.
local function finish_children(id, status, reason, now)
  local stack = {id}
  while #stack > 0 do
    local parent = table.remove(stack)
    for _, child in ipairs(redis.call('SMEMBERS', ns .. ':children:' .. parent)) do
      local f = redis.call('HMGET', jk(child), 'status', 'queue')
      if f[1] == 'waiting' then
        finish(child, f[2], 'waiting', status, now)
        redis.call('HSET', jk(child), 'last_error', reason, 'failed_by', parent)
        table.insert(stack, child)
      end
    end
  end
end
local function fail_dead(id, queue, old, error, tb, exc, now)
  finish(id, queue, old, 'failed', now)
  redis.call('HSET', jk(id), 'dead', 1, 'last_error', error, 'traceback', tb, 'result', exc)
  redis.call('ZADD', ns .. ':dead', now, id)
  local name = redis.call('HGET', jk(id), 'name')
  finish_children(id, 'failed', 'ParentFailed: parent job ' .. id .. ' (' .. name .. ') failed: ' .. error, now)
end
