-- envoyproxy/ratelimit's counting, in one call: INCRBY then EXPIRE on every counter, as
-- its Redis pipeline does, so that both services can share one Redis during a migration.
-- The same rule as meshtoll/counting/algorithms.py `hits_to_add` (keep the two in step).
--
-- KEYS[i]   counter i: envoyproxy/ratelimit's whole key, window start included
-- ARGV[1]   1: stop at the limit (STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT): when any
--           counter would pass its limit, only the counters that would pass it grow
-- ARGV[2+3(i-1) .. 4+3(i-1)], for counter i:
--   +0 hits     to add (0 only refreshes the expiry)
--   +1 limit    requests per unit (read only when ARGV[1] is 1)
--   +2 expire   seconds the counter lives after this call
-- Returns each counter's value after the call.

local stop = ARGV[1] == '1'
local adds = {}
local passes = {}
local any_passes = false
for i = 1, #KEYS do
  local at = 2 + 3 * (i - 1)
  adds[i] = tonumber(ARGV[at])
  if stop then
    local current = tonumber(redis.call('GET', KEYS[i]) or '0')
    passes[i] = current + adds[i] > tonumber(ARGV[at + 1])
    any_passes = any_passes or passes[i]
  end
end

local answer = {}
for i = 1, #KEYS do
  local hits = adds[i]
  if any_passes and not passes[i] then
    hits = 0
  end
  answer[i] = redis.call('INCRBY', KEYS[i], hits)
  redis.call('EXPIRE', KEYS[i], ARGV[2 + 3 * (i - 1) + 2])
end
return answer
