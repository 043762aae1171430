-- ARGV: id, now: a dead-lettered job runs again; the descendants it failed wait for it again
local id, now = ARGV[1], tonumber(ARGV[2])
local f = redis.call('HMGET', jk(id), 'dead', 'queue', 'status')
if f[1] ~= '1' then return 0 end
redis.call('ZREM', ns .. ':dead', id)
redis.call('ZREM', ns .. ':finished', id)
redis.call('ZREM', ns .. ':expiry', id)
redis.call('HSET', jk(id), 'dead', 0, 'attempts', 0, 'eta', now, 'finished', '', 'result', '')
redis.call('HINCRBY', jk(id), 'token', 1)
push(id, f[2], f[3], now)
local stack = {id}
while #stack > 0 do
  local parent = table.remove(stack)
  for _, child in ipairs(redis.call('SMEMBERS', ns .. ':children:' .. parent)) do
    local c = redis.call('HMGET', jk(child), 'failed_by', 'status', 'queue', 'parents', 'dead')
    if c[1] == parent and (c[2] == 'failed' or c[2] == 'cancelled') and c[5] ~= '1' then
      local pending, blocked = 0, false
      for pid in string.gmatch(c[4], '[^,]+') do
        local s = redis.call('HGET', jk(pid), 'status')
        if not s or s == 'failed' or s == 'cancelled' then blocked = true end
        if s ~= 'succeeded' then pending = pending + 1 end
      end
      if not blocked then
        set_status(child, c[3], c[2], 'waiting')
        redis.call('HSET', jk(child), 'failed_by', '', 'finished', '', 'last_error', '', 'pending', pending)
        redis.call('ZREM', ns .. ':finished', child)
        redis.call('ZREM', ns .. ':expiry', child)
        redis.call('ZADD', ns .. ':waiting', now, child)
        table.insert(stack, child)
      end
    end
  end
end
return 1
