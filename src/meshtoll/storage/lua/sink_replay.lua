-- Move quarantined records of a billing sink to its replay queue, which the sink delivers
-- before anything else (a record refused again comes back to the quarantine).
--
-- KEYS[1]  the sink's quarantine: hash, "<tenant>:<request id>" -> quarantined record (JSON)
-- KEYS[2]  the sink's replay queue: hash, same keys and values
-- ARGV     the keys to move; none: every quarantined record
-- Returns how many moved.

local keys = ARGV
if #keys == 0 then
  keys = redis.call('HKEYS', KEYS[1])
end
local moved = 0
for _, key in ipairs(keys) do
  local record = redis.call('HGET', KEYS[1], key)
  if record then
    redis.call('HSET', KEYS[2], key, record)
    redis.call('HDEL', KEYS[1], key)
    moved = moved + 1
  end
end
return moved
