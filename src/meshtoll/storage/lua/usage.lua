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
-- ARGV[1]  how long a seen marker lives, in seconds (the replay window)
-- ARGV[2]  the oldest ledger entry id to keep, in ms (XADD MINID, exact: a check of the first
--          entry when there is nothing to trim): the retention
-- ARGV[3], ARGV[4], ARGV[5]  how long a month, day and hour hash lives, in seconds
-- ARGV[5+i] record i as JSON: request_id, route, units, status_class, source, and the rest
--           for the ledger
-- A record, new or replayed, settles its admission: it leaves the hash and the set. The
-- counters of the new records are summed here first, so a batch costs one HINCRBY per
-- distinct counter instead of fifteen per record.
-- Returns the number of records counted now (replays count 0).

local admissions, pending, ledger = KEYS[#KEYS - 2], KEYS[#KEYS - 1], KEYS[#KEYS]
local sums, order, lifetimes = {}, {}, {}
-- k: the index of one of a record's period keys; sums are kept per hash name, since the
-- records of one batch mostly share their month, day and hour.
local function add(k, field, amount)
  local name = KEYS[k]
  local slot = sums[name]
  if not slot then
    slot = {}
    sums[name] = slot
    order[#order + 1] = name
    lifetimes[name] = ARGV[3 + (k - 2) % 4]  -- month, day or hour retention
  end
  slot[field] = (slot[field] or 0) + amount
end

local counted = 0
for i = 1, (#KEYS - 3) / 4 do
  local text = ARGV[5 + i]
  local record = cjson.decode(text)
  redis.call('HDEL', admissions, record.request_id)
  redis.call('ZREM', pending, record.request_id)
  if redis.call('SET', KEYS[4 * i - 3], '1', 'NX', 'EX', ARGV[1]) then
    local units = tonumber(record.units)
    for k = 4 * i - 2, 4 * i do
      add(k, 'requests', 1)
      add(k, 'units', units)
      add(k, 'route:' .. record.route .. ':requests', 1)
      add(k, 'route:' .. record.route .. ':units', units)
      add(k, 'status:' .. record.status_class, 1)
      if record.source == 'admission' then
        add(k, 'unreconciled', 1)
      end
    end
    redis.call('XADD', ledger, 'MINID', ARGV[2], '*', 'record', text)
    counted = counted + 1
  end
end

for _, name in ipairs(order) do
  for field, amount in pairs(sums[name]) do
    local value = redis.call('HINCRBY', name, field, amount)
    if field == 'requests' and value == amount then
      redis.call('EXPIRE', name, lifetimes[name])  -- a new hash
    end
  end
end
return counted
