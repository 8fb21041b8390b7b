-- Count a batch of one tenant's new usage records, in one call.
--
-- The caller sums the batch's counters itself and encodes its ledger entry, assuming that
-- every record is new, which is nearly always true: the script then only checks that
-- assumption and writes. Redis's cost is per batch, plus a set lookup and insert per
-- record. When some records were counted before (a replayed batch, or a late access-log
-- record of an admission already billed), the script writes nothing and returns which ones:
-- the caller drops them and calls again.
--
-- KEYS[1]  the tenant's admissions hash (request id -> what authz admitted), awaiting a record
-- KEYS[2]  the tenant's pending admissions, a sorted set of request ids by when they are due
--          for reconciliation (Admission.due)
-- KEYS[3]  the tenant's ledger stream: one entry per batch, field `records`, a JSON array
-- KEYS[4]  the set of request ids counted this week (the caller's clock), where new ids go
-- KEYS[5]  the set of those counted last week: with KEYS[4], a request counted in the last
--          seven days is found, whatever its record's own time says (an admission and its
--          access-log record carry different clocks)
-- KEYS[6]  the units body hooks reported for admitted requests (request id -> units)
-- KEYS[7]  the number of records ever appended to the ledger (a string counter): each entry
--          carries it as `last`, so that a record's place in the ledger is a number, and
--          what a billing sink has not delivered yet is a subtraction (meter/follower.py)
-- then for hour group g (1-based): KEYS[5+3g], KEYS[6+3g], KEYS[7+3g], the tenant's usage
--          hashes for the month, the day and the hour that group's records count in
-- ARGV[1]  how long a seen set lives after its last write, in seconds
-- ARGV[2]  the oldest ledger entry id to keep, in ms (XADD MINID): the retention
-- ARGV[3], ARGV[4], ARGV[5]  how long a month, day and hour hash lives, in seconds
-- ARGV[6]  the retention in seconds: the whole ledger expires when a tenant has written
--          nothing for that long (XADD MINID trims only on a write)
-- ARGV[7]  the ledger entry: the batch's records as a JSON array (field `records`)
-- ARGV[8]  C, the number of counter increments that follow
-- ARGV[9+3(c-1) .. 11+3(c-1)], increment c: hour group, hash field, amount
-- ARGV[9+3C ..]  the request ids, one per record, no two alike
-- Every id settles its admission, counted now or before: it leaves the admissions hash,
-- the pending set and the reported units.
-- Returns {counted, {indexes (1-based) of the ids counted before}}: {n, {}} when all n
-- were new and are counted now, {0, {...}} when nothing was written.

local admissions, pending, ledger, this_week, last_week = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local reported, appended = KEYS[6], KEYS[7]
local increments = tonumber(ARGV[8])
local first_id = 9 + 3 * increments
local ids = {unpack(ARGV, first_id)}
if #ids == 0 then
  return {0, {}}
end

if redis.call('EXISTS', admissions) == 1 then
  redis.call('HDEL', admissions, unpack(ids))
  redis.call('ZREM', pending, unpack(ids))
end
if redis.call('EXISTS', reported) == 1 then
  redis.call('HDEL', reported, unpack(ids))
end

local known = {}
for _, seen in ipairs({this_week, last_week}) do
  for i, member in ipairs(redis.call('SMISMEMBER', seen, unpack(ids))) do
    if member == 1 then
      known[#known + 1] = i
    end
  end
end
if #known > 0 then
  return {0, known}
end

redis.call('SADD', this_week, unpack(ids))
redis.call('EXPIRE', this_week, ARGV[1])
local last = redis.call('INCRBY', appended, #ids)
redis.call('XADD', ledger, 'MINID', ARGV[2], '*', 'records', ARGV[7], 'last', last)
redis.call('EXPIRE', ledger, ARGV[6])
redis.call('EXPIRE', appended, ARGV[6])
for c = 1, increments do
  local at = 9 + 3 * (c - 1)
  local group, field, amount = tonumber(ARGV[at]), ARGV[at + 1], ARGV[at + 2]
  for k = 1, 3 do  -- the month, day and hour hash
    local name = KEYS[4 + 3 * group + k]
    local value = redis.call('HINCRBY', name, field, amount)
    if field == 'requests' and value == tonumber(amount) then
      redis.call('EXPIRE', name, ARGV[2 + k])  -- a new hash
    end
  end
end
return {#ids, {}}
