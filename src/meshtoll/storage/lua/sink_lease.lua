-- Take a billing sink's lease, or extend it for its holder.
--
-- KEYS[1]  the sink's lease: the holder's owner token
-- ARGV[1]  the caller's owner token
-- ARGV[2]  how long the lease lasts from now, in ms (0: give it up, if held by the caller)
-- Returns 1 when the caller holds the lease (or gave it up), 0 when another does.

local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return 0
end
if tonumber(ARGV[2]) == 0 then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
