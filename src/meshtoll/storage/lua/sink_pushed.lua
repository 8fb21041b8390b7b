-- Record the windows `meshtoll usage push` delivered, only while the caller holds the
-- sink's lease (a push holds it while it delivers).
--
-- KEYS[1]  the sink's lease: the holder's owner token
-- KEYS[2]  the sink's pushed windows: a JSON list
-- ARGV[1]  the caller's owner token
-- ARGV[2]  the windows, a JSON list
-- Returns 1 when written, 0 when the caller does not hold the lease.

if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2])
return 1
