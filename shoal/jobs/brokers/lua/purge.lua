-- ARGV: queue ('' = all), finished_before ('' = any time), pending ('1' = also unstarted jobs)
local queue, before, pending = ARGV[1], ARGV[2], ARGV[3] == '1'
local n = 0
local function drop(id)
  drop_job(id)
  n = n + 1
end
local max = '+inf'
if before ~= '' then max = '(' .. before end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', ns .. ':finished', '-inf', max)) do
  local f = redis.call('HMGET', jk(id), 'queue', 'status')
  if not f[1] then
    redis.call('ZREM', ns .. ':finished', id)
  elseif queue == '' or f[1] == queue then
    drop(id)
  end
end
if pending then
  local ids = redis.call('ZRANGE', ns .. ':delayed', 0, -1)
  for _, id in ipairs(redis.call('ZRANGE', ns .. ':waiting', 0, -1)) do table.insert(ids, id) end
  local queues = {}
  if queue ~= '' then queues = {queue} else
    for _, field in ipairs(redis.call('HKEYS', ns .. ':counts')) do
      queues[string.match(field, '^(.*)|[^|]*$')] = true
    end
    local list = {}
    for q, _ in pairs(queues) do table.insert(list, q) end
    queues = list
  end
  for _, q in ipairs(queues) do
    for _, id in ipairs(redis.call('ZRANGE', ns .. ':ready:' .. q, 0, -1)) do table.insert(ids, id) end
  end
  for _, id in ipairs(ids) do
    local f = redis.call('HMGET', jk(id), 'queue', 'status')
    if f[1] and (queue == '' or f[1] == queue) and f[2] ~= 'running' then drop(id) end
  end
end
return n
