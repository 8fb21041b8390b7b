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
-- ARGV[6i..6i+5]  record i: request id, route, units, status class, source, and the whole
--                 record as JSON for the ledger (the fields the script needs come apart, so
--                 that it never decodes JSON)
-- A record, new or replayed, settles its admission: it leaves the hash and the set. The
-- counters of the new records are summed here first, so a batch costs one HINCRBY per
-- distinct counter and period instead of fifteen per record.
-- Returns the number of records counted now (replays count 0).

local admissions, pending, ledger = KEYS[#KEYS - 2], KEYS[#KEYS - 1], KEYS[#KEYS]
-- New records are summed per hour (their hour key names the month and day too) and per
-- (route, status class, source) before any counter is touched: a batch's records mostly
-- share all of these, so a record costs two table updates here, not a dozen HINCRBYs.
local groups, order = {}, {}

local counted = 0
for i = 1, (#KEYS - 3) / 4 do
  local at = 6 * i
  local record = {request_id = ARGV[at], route = ARGV[at + 1], units = tonumber(ARGV[at + 2]),
                  status_class = ARGV[at + 3], source = ARGV[at + 4]}
  redis.call('HDEL', admissions, record.request_id)
  redis.call('ZREM', pending, record.request_id)
  if redis.call('SET', KEYS[4 * i - 3], '1', 'NX', 'EX', ARGV[1]) then
    local hour = KEYS[4 * i]
    local group = groups[hour]
    if not group then
      group = {first = 4 * i - 2, sums = {}, kinds = {}}
      groups[hour] = group
      order[#order + 1] = group
    end
    local kind = record.route .. '\0' .. record.status_class .. '\0' .. record.source
    local sum = group.sums[kind]
    if not sum then
      sum = {route = record.route, status_class = record.status_class, source = record.source,
             requests = 0, units = 0}
      group.sums[kind] = sum
      group.kinds[#group.kinds + 1] = kind
    end
    sum.requests = sum.requests + 1
    sum.units = sum.units + record.units
    redis.call('XADD', ledger, 'MINID', ARGV[2], '*', 'record', ARGV[at + 5])
    counted = counted + 1
  end
end

for _, group in ipairs(order) do
  local fields = {}  -- field -> amount, summed over the group's kinds
  local names = {}
  local function add(field, amount)
    if not fields[field] then
      fields[field] = 0
      names[#names + 1] = field
    end
    fields[field] = fields[field] + amount
  end
  for _, kind in ipairs(group.kinds) do
    local sum = group.sums[kind]
    add('requests', sum.requests)
    add('units', sum.units)
    add('route:' .. sum.route .. ':requests', sum.requests)
    add('route:' .. sum.route .. ':units', sum.units)
    add('status:' .. sum.status_class, sum.requests)
    if sum.source == 'admission' then
      add('unreconciled', sum.requests)
    end
  end
  for k = 0, 2 do  -- the month, day and hour hash
    local name = KEYS[group.first + k]
    for _, field in ipairs(names) do
      local value = redis.call('HINCRBY', name, field, fields[field])
      if field == 'requests' and value == fields[field] then
        redis.call('EXPIRE', name, ARGV[3 + k])  -- a new hash
      end
    end
  end
end
return counted
