-- Move a billing sink forward, only while the caller holds the sink's lease: a lease
-- that expired under a slow caller and was taken by another instance makes this write
-- nothing (the other instance's cursors stand).
--
-- KEYS[1]  the sink's lease: the holder's owner token, expiring
-- KEYS[2]  the sink's cursors: hash, tenant -> cursor (JSON)
-- KEYS[3]  the sink's quarantine: hash, "<tenant>:<request id>" -> quarantined record (JSON)
-- KEYS[4]  the sink's replay queue: hash, same keys and values as the quarantine
-- ARGV[1]  the caller's owner token
-- ARGV[2]  C, the number of cursors that follow as tenant, cursor pairs
-- ARGV[3 .. 2+2C]  the cursors
-- ARGV[3+2C]  Q, the number of quarantined records that follow as key, record pairs
-- ARGV[4+2C .. 3+2C+2Q]  the quarantined records
-- ARGV[4+2C+2Q ..]  keys of replayed records now settled: out of the replay queue
-- Returns 1 when written, 0 when the caller does not hold the lease.

if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local cursors = tonumber(ARGV[2])
for i = 0, cursors - 1 do
  redis.call('HSET', KEYS[2], ARGV[3 + 2 * i], ARGV[4 + 2 * i])
end
local at = 3 + 2 * cursors
local quarantined = tonumber(ARGV[at])
for i = 0, quarantined - 1 do
  redis.call('HSET', KEYS[3], ARGV[at + 1 + 2 * i], ARGV[at + 2 + 2 * i])
  -- A replayed record refused again goes back with its new answer.
  redis.call('HDEL', KEYS[4], ARGV[at + 1 + 2 * i])
end
for i = at + 1 + 2 * quarantined, #ARGV do
  redis.call('HDEL', KEYS[4], ARGV[i])
end
return 1
