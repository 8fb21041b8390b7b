-- Leased hits a process never used, given back (on shutdown), as counting/algorithms.py's
-- after_release does it (keep the two in step).
--
-- KEYS[#KEYS]    this return's marker: when it exists the return already ran (a client
--                resent it after a lost reply) and nothing is given back twice. Same slot
--                as KEYS[1].
-- KEYS[i]        the counter of unused lease i: a window's count (the window of the moment
--                of the return) or a token bucket's TAT (ms)
-- ARGV[3i-2]     hits to give back
-- ARGV[3i-1]     token bucket: its emission interval (ms); a window: 0
-- ARGV[3i]       token bucket: the TAT the lease left; the hits go back only while the TAT
--                is still that (nothing took from the bucket since), the one exact case
-- Returns the number of hits given back.

local marker = KEYS[#KEYS]
if redis.call('SET', marker, '1', 'NX', 'PX', 10000) == false then
  return 0
end
local given = 0
for i = 1, #KEYS - 1 do
  local hits = tonumber(ARGV[3 * i - 2])
  local interval = tonumber(ARGV[3 * i - 1])
  local value = tonumber(redis.call('GET', KEYS[i]) or '0')
  if interval == 0 then
    -- A missing counter expired with its window: its leased hits went with it.
    if value > 0 then
      local back = math.min(hits, value)
      redis.call('DECRBY', KEYS[i], back)
      given = given + back
    end
  elseif value == tonumber(ARGV[3 * i]) then
    redis.call('SET', KEYS[i], value - hits * interval, 'KEEPTTL')
    given = given + hits
  end
end
return given
