-- Tollgate settlement: refund (or charge) the difference between reserved and actual
-- tokens, release concurrency leases, and turn the budget reservation into spend.
--
-- KEYS: as for admission.
-- ARGV: reservation id, reserved tokens, actual tokens, actual cost, number of scopes,
--       then per scope: tokens limited (0/1), concurrency limited (0/1),
--       then budget present (0/1), budget key ttl seconds.
local id = ARGV[1]
local refund = tonumber(ARGV[2]) - tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
for i = 0, n - 1 do
  local kt, kc = KEYS[2 + 3 * i], KEYS[3 + 3 * i]
  if ARGV[6 + 2 * i] == '1' and redis.call('EXISTS', kt) == 1 then
    -- The level may pass the capacity here; reads clamp it.
    redis.call('HINCRBYFLOAT', kt, 'l', refund)
  end
  if ARGV[7 + 2 * i] == '1' then redis.call('ZREM', kc, id) end
end
local b = 6 + 2 * n
if ARGV[b] == '1' then
  local ks, kz, kh = KEYS[3 * n + 1], KEYS[3 * n + 2], KEYS[3 * n + 3]
  redis.call('ZREM', kz, id)
  redis.call('HDEL', kh, id)
  redis.call('INCRBYFLOAT', ks, cost)
  redis.call('EXPIRE', ks, tonumber(ARGV[b + 1]))
end
return 1
