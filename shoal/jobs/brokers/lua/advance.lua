-- ARGV: schedule name, slot: record the slot as fired (never backwards)
local last = redis.call('HGET', ns .. ':schedules', ARGV[1])
if not last or tonumber(last) < tonumber(ARGV[2]) then
  redis.call('HSET', ns .. ':schedules', ARGV[1], ARGV[2])
end
return 1
