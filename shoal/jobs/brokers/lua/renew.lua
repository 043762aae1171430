-- ARGV: now, lease, id1, token1, id2, token2, ... -> ids no longer held
local until_ = tonumber(ARGV[1]) + tonumber(ARGV[2])
local lost = {}
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  local f = redis.call('HMGET', jk(id), 'status', 'token')
  if f[1] == 'running' and f[2] == ARGV[i + 1] then
    redis.call('HSET', jk(id), 'lease', until_)
    redis.call('ZADD', ns .. ':leases', until_, id)
  else
    table.insert(lost, id)
  end
end
return lost
