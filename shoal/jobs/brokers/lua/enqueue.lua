-- ARGV: id, name, queue, priority, eta, max_attempts, key, parents (comma-separated), message, now
local id, name, queue = ARGV[1], ARGV[2], ARGV[3]
local key, parents, now = ARGV[7], ARGV[8], tonumber(ARGV[10])
if key ~= '' then
  local existing = redis.call('HGET', ns .. ':keys', key)
  if existing then return {existing, 0} end
end
if redis.call('EXISTS', jk(id)) == 1 then return {id, 0} end
local pending, bad, bad_status, bad_name, bad_error = 0, nil, nil, nil, nil
local ids = {}
for pid in string.gmatch(parents, '[^,]+') do
  local f = redis.call('HMGET', jk(pid), 'status', 'name', 'last_error')
  if not f[1] then return redis.error_reply('unknown parent job ' .. pid) end
  table.insert(ids, pid)
  if f[1] ~= 'succeeded' then pending = pending + 1 end
  if (f[1] == 'failed' or f[1] == 'cancelled') and not bad then
    bad, bad_status, bad_name, bad_error = pid, f[1], f[2], f[3]
  end
end
redis.call('HSET', jk(id), 'id', id, 'name', name, 'queue', queue, 'status', 'new',
  'priority', ARGV[4], 'eta', ARGV[5], 'max_attempts', ARGV[6], 'attempts', 0, 'token', 0,
  'pending', pending, 'created', now, 'key', key, 'parents', parents, 'message', ARGV[9], 'dead', 0)
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
