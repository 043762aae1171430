-- ARGV: now, then per job: id, name, queue, priority, eta, max_attempts, key, parents, message
-- -> {id, created, id, created, ...}. The same as enqueue.lua on each job in turn, except
-- that every parent is checked first, so an unknown one stores nothing.
local now = tonumber(ARGV[1])
local created, keys = {}, {}
for b = 2, #ARGV, 9 do
  local id, key = ARGV[b], ARGV[b + 6]
  for pid in string.gmatch(ARGV[b + 7], '[^,]+') do
    if not created[pid] and redis.call('EXISTS', jk(pid)) == 0 then
      return redis.error_reply('unknown parent job ' .. pid)
    end
  end
  if key == '' then
    created[id] = true
  elseif not keys[key] and redis.call('HEXISTS', ns .. ':keys', key) == 0 then
    created[id] = true
    keys[key] = true
  end
end
local out = {}
for b = 2, #ARGV, 9 do
  local one = enqueue_one(ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5],
    ARGV[b + 6], ARGV[b + 7], ARGV[b + 8], now)
  table.insert(out, one[1])
  table.insert(out, one[2])
end
return out
