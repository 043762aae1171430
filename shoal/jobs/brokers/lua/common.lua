-- Helpers every script starts with. KEYS[1] is the namespace, e.g. "{shoal.jobs}": all keys
-- share its hash tag. A job is the hash NS:job:ID; indexes are sorted sets of ids.
local ns = KEYS[1]
local function jk(id) return ns .. ':job:' .. id end
-- The envelope apart from the hash, so that the hash stays small (a listpack in Redis).
local function mk(id) return ns .. ':msg:' .. id end
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
  local ttl = redis.call('HGET', jk(id), 'result_ttl')
  if ttl and ttl ~= '' then redis.call('ZADD', ns .. ':expiry', now + tonumber(ttl), id) end
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
-- Delete job ID and every trace of it (purge, expiry).
local function drop_job(id)
  local f = redis.call('HMGET', jk(id), 'queue', 'status', 'key')
  if f[1] then
    count(f[1], f[2], -1)
    if f[3] and f[3] ~= '' and redis.call('HGET', ns .. ':keys', f[3]) == id then
      redis.call('HDEL', ns .. ':keys', f[3])
    end
    redis.call('ZREM', ns .. ':ready:' .. f[1], id)
  end
  redis.call('DEL', jk(id), mk(id), ns .. ':children:' .. id)
  for _, index in ipairs({'finished', 'dead', 'delayed', 'waiting', 'expiry'}) do
    redis.call('ZREM', ns .. ':' .. index, id)
  end
end
-- Delete up to 100 finished jobs whose result_ttl has passed (no process of its own).
local function expire_some(now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', ns .. ':expiry', '-inf', now, 'LIMIT', 0, 100)) do
    drop_job(id)
  end
end
-- Whether job ID still holds its idempotency key (shoal/jobs/policy/keys.py).
local function key_holds(id, now)
  local f = redis.call('HMGET', jk(id), 'status', 'eta', 'finished', 'result_ttl', 'key_until',
    'key_expires')
  if not f[1] then return false end
  local status = f[1]
  if status == 'queued' and tonumber(f[2]) > now then status = 'scheduled' end
  if f[3] and f[3] ~= '' and f[4] and f[4] ~= '' and tonumber(f[3]) + tonumber(f[4]) <= now then
    return false
  end
  if f[6] and f[6] ~= '' and tonumber(f[6]) <= now then return false end
  if f[5] == 'start' then
    return status == 'waiting' or status == 'scheduled' or status == 'queued'
  elseif f[5] == 'finish' then
    return status ~= 'succeeded' and status ~= 'failed' and status ~= 'cancelled'
  end
  return true
end
-- The optional fields of a job (extra: {result_ttl, key_until, key_expires, limit_key, rate,
-- max_concurrency}, '' when unset): written only when set, so plain jobs stay small.
local EXTRA_FIELDS = {'result_ttl', 'key_until', 'key_expires', 'limit_key', 'rate', 'max_concurrency'}
local function set_extra(id, extra)
  for i = 1, 6 do
    if extra[i] and extra[i] ~= '' then redis.call('HSET', jk(id), EXTRA_FIELDS[i], extra[i]) end
  end
end
-- Store one job (see Broker.enqueue); {id, created}. An unknown parent is an error reply
-- (callers that must store nothing then check parents first: enqueue_many.lua).
local function enqueue_one(id, name, queue, priority, eta, max_attempts, key, parents, message, now,
    extra)
  if key ~= '' then
    local existing = redis.call('HGET', ns .. ':keys', key)
    if existing then
      if key_holds(existing, now) then return {existing, 0} end
      -- Its key no longer holds: the new job takes it over.
      if redis.call('EXISTS', jk(existing)) == 1 then redis.call('HSET', jk(existing), 'key', '') end
    end
  end
  if redis.call('EXISTS', jk(id)) == 1 then return {id, 0} end
  local pending, bad, bad_status, bad_name, bad_error = 0, nil, nil, nil, nil
  local ids = {}
  for pid in string.gmatch(parents, '[^,]+') do
    local f = redis.call('HMGET', jk(pid), 'status', 'name', 'last_error')
    if not f[1] then return nil, pid end
    table.insert(ids, pid)
    if f[1] ~= 'succeeded' then pending = pending + 1 end
    if (f[1] == 'failed' or f[1] == 'cancelled') and not bad then
      bad, bad_status, bad_name, bad_error = pid, f[1], f[2], f[3]
    end
  end
  redis.call('HSET', jk(id), 'id', id, 'name', name, 'queue', queue, 'status', 'new',
    'priority', priority, 'eta', eta, 'max_attempts', max_attempts, 'attempts', 0, 'token', 0,
    'pending', pending, 'created', now, 'key', key, 'parents', parents, 'dead', 0)
  redis.call('SET', mk(id), message)
  set_extra(id, extra)
  count(queue, 'new', 1)
  if key ~= '' then redis.call('HSET', ns .. ':keys', key, id) end
  for _, pid in ipairs(ids) do redis.call('SADD', ns .. ':children:' .. pid, id) end
  if bad then
    finish(id, queue, 'new', bad_status, now)
    local reason
    if bad_status == 'failed' then
      reason = 'ParentFailed: parent job ' .. bad .. ' (' .. bad_name .. ') failed: ' .. bad_error
    else
      reason = 'ParentCancelled: parent job ' .. bad .. ' (' .. bad_name .. ') was cancelled'
    end
    redis.call('HSET', jk(id), 'last_error', reason, 'failed_by', bad)
  elseif pending > 0 then
    set_status(id, queue, 'new', 'waiting')
    redis.call('ZADD', ns .. ':waiting', now, id)
  else
    push(id, queue, 'new', now)
  end
  return {id, 1}
end
-- Whether job ID may start now under its rate and concurrency limits (counting its start),
-- or when to look at it again (shoal/jobs/policy/limits.py).
local CONCURRENCY_RECHECK = 0.05
local function limited(id, now)
  local f = redis.call('HMGET', jk(id), 'limit_key', 'rate', 'max_concurrency')
  local lk = f[1]
  if not lk or lk == '' then return nil end
  local running = ns .. ':limit:running:' .. lk
  if f[3] and f[3] ~= '' then
    for _, other in ipairs(redis.call('SMEMBERS', running)) do
      if redis.call('HGET', jk(other), 'status') ~= 'running' then redis.call('SREM', running, other) end
    end
    if redis.call('SCARD', running) >= tonumber(f[3]) then return now + CONCURRENCY_RECHECK end
  end
  if f[2] and f[2] ~= '' then
    local tat = tonumber(redis.call('HGET', ns .. ':limit:tat', lk) or '')
    if tat and tat > now then return tat end
    redis.call('HSET', ns .. ':limit:tat', lk, now + tonumber(f[2]))
  end
  if f[3] and f[3] ~= '' then redis.call('SADD', running, id) end
  return nil
end
