-- ARGV: now, headers, message... where headers is a MessagePack array with, per job, the
-- array {id, name, queue, priority, eta, max_attempts, key, parents, result_ttl, key_until,
-- key_expires, limit_key, rate, max_concurrency} (all strings, '' = unset; two
-- arguments per job instead of nine: packing arguments is most of a producer's cost).
-- -> {id, created, id, created, ...}. The same as enqueue.lua on each job in turn, except
-- that every parent is checked first, so an unknown one stores nothing.
local now = tonumber(ARGV[1])
expire_some(now)
local jobs = cmsgpack.unpack(ARGV[2])
local created, keys = {}, {}
for j = 1, #jobs do
  local id, key = jobs[j][1], jobs[j][7]
  for pid in string.gmatch(jobs[j][8], '[^,]+') do
    if not created[pid] and redis.call('EXISTS', jk(pid)) == 0 then
      return redis.error_reply('unknown parent job ' .. pid)
    end
  end
  if key == '' then
    created[id] = true
  elseif not keys[key] then
    local existing = redis.call('HGET', ns .. ':keys', key)
    if not existing or not key_holds(existing, now) then
      created[id] = true
      keys[key] = true
    end
  end
end
-- Jobs with no key and no parents (the common case) take a short path: their hash, and
-- index entries and counters gathered per queue and written once at the end. Sequence
-- numbers (FIFO within a priority) are given in batch order, as one enqueue each would.
local seq_key = ns .. ':seq'
local seq = tonumber(redis.call('GET', seq_key) or '0')
local ready, delayed, counted = {}, {}, {}
local out = {}
for j = 1, #jobs do
  local id, name, queue, priority, eta, max_attempts, key, parents = unpack(jobs[j], 1, 8)
  local extra = {unpack(jobs[j], 9, 14)}
  local message = ARGV[j + 2]
  if key == '' and parents == '' then
    if redis.call('EXISTS', jk(id)) == 1 then
      table.insert(out, id)
      table.insert(out, 0)
    else
      local status
      if tonumber(eta) > now then
        status = 'scheduled'
        table.insert(delayed, eta)
        table.insert(delayed, id)
      else
        status = 'queued'
        seq = seq + 1
        local q = ready[queue]
        if not q then q = {}; ready[queue] = q end
        table.insert(q, (1000 - tonumber(priority)) * 1099511627776 + seq)
        table.insert(q, id)
      end
      redis.call('HSET', jk(id), 'id', id, 'name', name, 'queue', queue, 'status', status,
        'priority', priority, 'eta', eta, 'max_attempts', max_attempts, 'attempts', 0, 'token', 0,
        'pending', 0, 'created', now, 'key', '', 'parents', '', 'dead', 0)
      redis.call('SET', mk(id), message)
      set_extra(id, extra)
      local field = queue .. '|' .. status
      counted[field] = (counted[field] or 0) + 1
      table.insert(out, id)
      table.insert(out, 1)
    end
  else
    redis.call('SET', seq_key, seq)
    local one = enqueue_one(id, name, queue, priority, eta, max_attempts, key, parents, message,
      now, extra)
    seq = tonumber(redis.call('GET', seq_key) or '0')
    table.insert(out, one[1])
    table.insert(out, one[2])
  end
end
redis.call('SET', seq_key, seq)
local function zadd_all(zkey, flat)
  for i = 1, #flat, 1000 do
    redis.call('ZADD', zkey, unpack(flat, i, math.min(i + 999, #flat)))
  end
end
for queue, flat in pairs(ready) do
  zadd_all(ns .. ':ready:' .. queue, flat)
  redis.call('LPUSH', ns .. ':wake:' .. queue, 1)
  redis.call('LTRIM', ns .. ':wake:' .. queue, 0, 15)
end
zadd_all(ns .. ':delayed', delayed)
for field, n in pairs(counted) do
  redis.call('HINCRBY', ns .. ':counts', field, n)
end
return out
