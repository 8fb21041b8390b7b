-- One decision's counter checks, atomically: evaluate every check; when every non-shadow
-- check admits its cost, consume every cost and every lease grant; otherwise consume nothing.
-- The same algorithms as meshtoll/counting/algorithms.py (keep the two in step).
--
-- KEYS[#KEYS] only when #KEYS is odd: this decision's marker. When present the decision
--             already ran (a client retried after a lost reply) and its stored answer is
--             returned unchanged, so a retry never counts twice. Same slot as KEYS[1].
--             Clients that never retry a decision that may have run send no marker.
-- KEYS[2i-1]  check i's first counter: fixed window -> the current window's count;
--             sliding window -> the current window's count; token bucket -> its TAT (ms)
-- KEYS[2i]    check i's second counter: sliding window -> the previous window's count;
--             otherwise the same key as KEYS[2i-1] (unused)
-- ARGV[1]     now, Unix time in milliseconds (the caller's clock: decisions are testable)
-- ARGV[2+8(i-1) .. 9+8(i-1)], for check i:
--   +0 algorithm  1 fixed window, 2 sliding window, 3 token bucket
--   +1 requests   the limit per window (bucket: unused here, its rate is in `a`)
--   +2 cost       hits to consume; 0 only looks
--   +3 shadow     1: never refuses, still counted
--   +4 a          fixed: window end (ms); sliding: window start (ms); bucket: emission interval (ms)
--   +5 b          fixed: unused; sliding: window end (ms); bucket: capacity
--   +6 expire     how long KEYS[2i-1] lives after a write, in ms from now
--   +7 lease      hits the caller would reserve beyond the cost (a token lease); the grant is
--                 at most this, at most an eighth of what is left after the cost, a multiple
--                 of the cost, and 0 for a look (cost 0) or a shadow check
-- Returns, per check: {admits (0/1), first counter after the decision, second counter,
--                      hits granted to the lease (consumed with the cost)}.

local MARKER_TTL_MS = 10000
local LEASE_SHARE = 8
local marker = nil
if #KEYS % 2 == 1 then
  marker = KEYS[#KEYS]
  local done = redis.call('GET', marker)
  if done then
    return cjson.decode(done)
  end
end

local now = tonumber(ARGV[1])
local count = math.floor(#KEYS / 2)
local plans = {}
local admitted = true

for i = 1, count do
  local at = 2 + 8 * (i - 1)
  local p = {
    algorithm = tonumber(ARGV[at]), requests = tonumber(ARGV[at + 1]), cost = tonumber(ARGV[at + 2]),
    shadow = ARGV[at + 3] == '1', a = tonumber(ARGV[at + 4]), b = tonumber(ARGV[at + 5]),
    expire = tonumber(ARGV[at + 6]), lease = tonumber(ARGV[at + 7]),
  }
  p.first = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
  p.second = 0
  local want = math.max(p.cost, 1)
  local free
  if p.algorithm == 1 then
    p.admits = p.first + want <= p.requests
    free = p.requests - p.first
  elseif p.algorithm == 2 then
    p.second = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
    local weight = (p.b - now) / (p.b - p.a)
    p.admits = p.second * weight + p.first + want <= p.requests
    free = math.floor(p.requests - (p.second * weight + p.first))
  else
    local tat = math.max(p.first, now)
    p.admits = tat + want * p.a - p.b * p.a <= now
    free = math.floor((now - tat + p.b * p.a) / p.a)
  end
  p.grant = 0
  if p.lease > 0 and p.cost > 0 and not p.shadow then
    local grant = math.min(p.lease, math.floor((free - p.cost) / LEASE_SHARE))
    p.grant = math.max(0, math.floor(grant / p.cost) * p.cost)
  end
  if not p.admits and not p.shadow then
    admitted = false
  end
  plans[i] = p
end

local answer = {}
for i = 1, count do
  local p = plans[i]
  if not admitted then
    p.grant = 0
  end
  local take = p.cost + p.grant
  if admitted and take > 0 then
    if p.algorithm == 3 then
      p.first = math.max(p.first, now) + take * p.a
      redis.call('SET', KEYS[2 * i - 1], p.first, 'PX', p.expire)
    else
      p.first = redis.call('INCRBY', KEYS[2 * i - 1], take)
      if p.first == take then
        -- A new counter: one window's key, so its expiry is set once.
        redis.call('PEXPIRE', KEYS[2 * i - 1], p.expire)
      end
    end
  end
  answer[4 * i - 3] = p.admits and 1 or 0
  answer[4 * i - 2] = p.first
  answer[4 * i - 1] = p.second
  answer[4 * i] = p.grant
end
if marker then
  redis.call('SET', marker, cjson.encode(answer), 'PX', MARKER_TTL_MS)
end
return answer
