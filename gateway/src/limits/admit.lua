-- Tollgate admission: check every limit of every scope, then reserve them all, or none.
-- Time comes from the Redis server, so replicas with skewed clocks agree.
--
-- KEYS: for each scope (3 each): requests bucket, tokens bucket, concurrency lease set;
--       then the budget's spent counter, reservation lease set, reservation amounts;
--       then this reservation's marker ('1' once admitted; 'x' if it was cancelled before
--       it ran, e.g. after the caller timed out, so a late admission reserves nothing).
-- ARGV: reservation id, tokens asked, cost asked, lease ms, number of scopes,
--       then per scope: requests/min, tokens/min, max concurrent (0 = no limit),
--       then budget amount (-1 = none), budget key ttl seconds.
-- Returns {0, limit, scope index, retry ms} or {1, requests level..., tokens level...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
local tokens = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local lease = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local marker = KEYS[3 * n + 4]
if redis.call('EXISTS', marker) == 1 then return {0, 'cancelled', 0, 0} end

local function level(key, cap)
  local v = redis.call('HMGET', key, 'l', 't')
  if not v[1] then return cap end
  local l = tonumber(v[1]) + cap * (now - tonumber(v[2])) / 60000
  if l > cap then l = cap end
  return l
end

for i = 0, n - 1 do
  local rpm, tpm, conc = tonumber(ARGV[6 + 3 * i]), tonumber(ARGV[7 + 3 * i]), tonumber(ARGV[8 + 3 * i])
  local kr, kt, kc = KEYS[1 + 3 * i], KEYS[2 + 3 * i], KEYS[3 + 3 * i]
  if rpm > 0 then
    local l = level(kr, rpm)
    if l < 1 then return {0, 'requests', i, math.ceil((1 - l) * 60000 / rpm)} end
  end
  if tpm > 0 then
    local need = math.min(tokens, tpm)
    local l = level(kt, tpm)
    if l < need then return {0, 'tokens', i, math.ceil((need - l) * 60000 / tpm)} end
  end
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', kc, '-inf', now)
    if redis.call('ZCARD', kc) >= conc then return {0, 'concurrency', i, 1000} end
  end
end

local b = 6 + 3 * n
local amount, budget_ttl = tonumber(ARGV[b]), tonumber(ARGV[b + 1])
local ks, kz, kh = KEYS[3 * n + 1], KEYS[3 * n + 2], KEYS[3 * n + 3]
if amount >= 0 then
  -- Reservations of replicas that died expire with their lease.
  local dead = redis.call('ZRANGEBYSCORE', kz, '-inf', now)
  for _, d in ipairs(dead) do
    redis.call('ZREM', kz, d)
    local v = redis.call('HGET', kh, d)
    if v then
      redis.call('HDEL', kh, d)
      redis.call('HINCRBYFLOAT', kh, '#total', -tonumber(v))
    end
  end
  -- The '#total' field keeps the sum of the amounts, so admission costs the same with
  -- 5 or 5,000 reservations outstanding. With none left it is dropped, shedding any
  -- floating-point drift.
  if redis.call('HLEN', kh) == 1 and redis.call('HEXISTS', kh, '#total') == 1 then
    redis.call('DEL', kh)
  end
  local reserved = math.max(0, tonumber(redis.call('HGET', kh, '#total') or '0'))
  local spent = tonumber(redis.call('GET', ks) or '0')
  if spent + reserved + cost > amount then return {0, 'budget', 0, -1} end
end

local out = {1}
for i = 0, n - 1 do
  local rpm, tpm, conc = tonumber(ARGV[6 + 3 * i]), tonumber(ARGV[7 + 3 * i]), tonumber(ARGV[8 + 3 * i])
  local kr, kt, kc = KEYS[1 + 3 * i], KEYS[2 + 3 * i], KEYS[3 + 3 * i]
  local lr, lt = '-1', '-1'
  if rpm > 0 then
    local l = level(kr, rpm) - 1
    redis.call('HSET', kr, 'l', tostring(l), 't', now)
    redis.call('PEXPIRE', kr, 120000)
    lr = tostring(l)
  end
  if tpm > 0 then
    local l = level(kt, tpm) - tokens
    redis.call('HSET', kt, 'l', tostring(l), 't', now)
    redis.call('PEXPIRE', kt, 120000)
    lt = tostring(l)
  end
  if conc > 0 then
    redis.call('ZADD', kc, now + lease, id)
    redis.call('PEXPIRE', kc, lease * 2)
  end
  table.insert(out, lr)
  table.insert(out, lt)
end
if amount >= 0 then
  redis.call('ZADD', kz, now + lease, id)
  redis.call('HSET', kh, id, tostring(cost))
  redis.call('HINCRBYFLOAT', kh, '#total', cost)
  redis.call('EXPIRE', kz, budget_ttl)
  redis.call('EXPIRE', kh, budget_ttl)
end
redis.call('SET', marker, '1', 'PX', lease)
return out
