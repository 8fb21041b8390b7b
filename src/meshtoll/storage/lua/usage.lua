-- Count a batch of one tenant's usage records, each exactly once.
--
-- For record i (1-based), four keys in the tenant's hash-tag slot:
--   KEYS[4i-3]  the record's "seen" marker (request id); SET NX decides first-time-or-replay
--   KEYS[4i-2]  the tenant's usage hash for the record's month
--   KEYS[4i-1]  ... for its day
--   KEYS[4i]    ... for its hour
-- and last, three keys of the tenant's:
--   KEYS[#KEYS-2]  admissions hash (request id -> what authz admitted), awaiting their record
--   KEYS[#KEYS-1]  pending admissions, a sorted set of request ids by admission time
--   KEYS[#KEYS]    the ledger stream
-- A record, new or replayed, settles its admission: it leaves the hash and the set.
-- ARGV[1]  how long a seen marker lives, in seconds (the replay window)
-- ARGV[2]  the ledger's approximate maximum length (XADD MAXLEN ~)
-- ARGV[3], ARGV[4], ARGV[5]  how long a month, day and hour hash lives, in seconds
-- ARGV[5+i] record i as JSON: route, units, status_class, source, and the rest for the ledger
-- Returns the number of records counted now (replays count 0).

local admissions, pending, ledger = KEYS[#KEYS - 2], KEYS[#KEYS - 1], KEYS[#KEYS]
local counted = 0
for i = 1, (#KEYS - 3) / 4 do
  local text = ARGV[5 + i]
  local record = cjson.decode(text)
  redis.call('HDEL', admissions, record.request_id)
  redis.call('ZREM', pending, record.request_id)
  if redis.call('SET', KEYS[4 * i - 3], '1', 'NX', 'EX', ARGV[1]) then
    local route = record.route
    local units = tonumber(record.units)
    local class = record.status_class
    for k = 4 * i - 2, 4 * i do
      if redis.call('HINCRBY', KEYS[k], 'requests', 1) == 1 then
        redis.call('EXPIRE', KEYS[k], ARGV[3 + (k - (4 * i - 2))])
      end
      redis.call('HINCRBY', KEYS[k], 'units', units)
      redis.call('HINCRBY', KEYS[k], 'route:' .. route .. ':requests', 1)
      redis.call('HINCRBY', KEYS[k], 'route:' .. route .. ':units', units)
      redis.call('HINCRBY', KEYS[k], 'status:' .. class, 1)
      if record.source == 'admission' then
        redis.call('HINCRBY', KEYS[k], 'unreconciled', 1)
      end
    end
    redis.call('XADD', ledger, 'MAXLEN', '~', ARGV[2], '*', 'record', text)
    counted = counted + 1
  end
end
return counted
