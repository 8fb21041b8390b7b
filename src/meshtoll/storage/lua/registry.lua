-- One change to one run-time tenant, atomically: the version check, the key-hash uniqueness
-- among run-time tenants, the version bump, the change log entry and the audit entry happen
-- together or not at all. Every key carries the hash tag {registry}: on a Redis Cluster they
-- all live on one shard, so this is one call there too (meshtoll/keys.py).
--
-- KEYS[1]  hash: tenant -> its record, a JSON object whose first field is "version"
-- KEYS[2]  hash: key SHA-256 (hex) -> the run-time tenant holding the key
-- KEYS[3]  string: the registry's version, +1 per change
-- KEYS[4]  stream: the change log, an entry per change: v <version> t <tenant>
-- KEYS[5]  stream: the audit log, an entry per change: e <JSON object, "version" first>
-- KEYS[6]  hash: "<tenant>\n<key id>" -> the minute the key was last used
-- ARGV[1]  the tenant
-- ARGV[2]  the tenant's version the change was made from (0: the tenant must not exist)
-- ARGV[3]  the tenant's new record without its version, a JSON object; "" deletes the tenant
-- ARGV[4]  the audit entry without its version, a JSON object
-- ARGV[5]  entries the change log keeps (approximately); ARGV[6] the same for the audit log
-- ARGV[7]  a, the count of key hashes the tenant gains, then those a hashes;
--          then r, the count it loses, then those r hashes;
--          then the key ids whose last-used times go (the rest of ARGV)
-- Returns {"ok", new version} | {"stale", the tenant's version, 0 if absent}
--       | {"key_in_use", the tenant holding the key}

local tenant = ARGV[1]
local stored = redis.call('HGET', KEYS[1], tenant)
local current = 0
if stored then
  current = tonumber(string.match(stored, '^{"version":(%d+)'))
end
if current ~= tonumber(ARGV[2]) then
  return {'stale', current}
end

local added = tonumber(ARGV[7])
for i = 8, 7 + added do
  local owner = redis.call('HGET', KEYS[2], ARGV[i])
  if owner and owner ~= tenant then
    return {'key_in_use', owner}
  end
end

local version = redis.call('INCR', KEYS[3])
local at = 8 + added
local removed = tonumber(ARGV[at])
for i = at + 1, at + removed do
  if redis.call('HGET', KEYS[2], ARGV[i]) == tenant then
    redis.call('HDEL', KEYS[2], ARGV[i])
  end
end
for i = 8, 7 + added do
  redis.call('HSET', KEYS[2], ARGV[i], tenant)
end
for i = at + removed + 1, #ARGV do
  redis.call('HDEL', KEYS[6], tenant .. '\n' .. ARGV[i])
end

if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], tenant)
else
  redis.call('HSET', KEYS[1], tenant, '{"version":' .. version .. ',' .. string.sub(ARGV[3], 2))
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'v', version, 't', tenant)
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', 'e',
  '{"version":' .. version .. ',' .. string.sub(ARGV[4], 2))
return {'ok', version}
