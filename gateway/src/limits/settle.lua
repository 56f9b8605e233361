-- Tollgate settlement: refund (or charge) the difference between reserved and actual
-- tokens, release concurrency leases, and turn the budget reservation into spend.
-- Cancelling (a reservation another scope refused, on a cluster) gives back the request
-- unit and every reserved token too, and spends nothing.
--
-- A cancel may also arrive before (or instead of) the admission it cancels, when the
-- caller gave up waiting: it then leaves the marker as a tombstone, and the admission, if
-- it ever runs, reserves nothing.
--
-- KEYS: as for admission (the reservation's marker last).
-- ARGV: reservation id, reserved tokens, actual tokens, actual cost, cancel (0/1),
--       number of scopes, then per scope: requests limited, tokens limited, concurrency
--       limited (0/1 each), then budget present (0/1), budget key ttl seconds, lease ms.
local id = ARGV[1]
local refund = tonumber(ARGV[2]) - tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local cancel = ARGV[5] == '1'
local n = tonumber(ARGV[6])
local marker = KEYS[3 * n + 4]
if cancel then
  refund = tonumber(ARGV[2])
  if redis.call('GET', marker) ~= '1' then
    redis.call('SET', marker, 'x', 'PX', tonumber(ARGV[7 + 3 * n + 2]))
    return 0
  end
end
redis.call('DEL', marker)
for i = 0, n - 1 do
  local kr, kt, kc = KEYS[1 + 3 * i], KEYS[2 + 3 * i], KEYS[3 + 3 * i]
  if cancel and ARGV[7 + 3 * i] == '1' and redis.call('EXISTS', kr) == 1 then
    redis.call('HINCRBYFLOAT', kr, 'l', 1)
  end
  if ARGV[8 + 3 * i] == '1' and redis.call('EXISTS', kt) == 1 then
    -- The level may pass the capacity here; reads clamp it.
    redis.call('HINCRBYFLOAT', kt, 'l', refund)
  end
  if ARGV[9 + 3 * i] == '1' then redis.call('ZREM', kc, id) end
end
local b = 7 + 3 * n
if ARGV[b] == '1' then
  local ks, kz, kh = KEYS[3 * n + 1], KEYS[3 * n + 2], KEYS[3 * n + 3]
  redis.call('ZREM', kz, id)
  local reserved = redis.call('HGET', kh, id)
  if reserved then
    redis.call('HDEL', kh, id)
    if redis.call('HLEN', kh) == 1 and redis.call('HEXISTS', kh, '#total') == 1 then
      redis.call('DEL', kh)
    else
      redis.call('HINCRBYFLOAT', kh, '#total', -tonumber(reserved))
    end
  end
  if not cancel then
    redis.call('INCRBYFLOAT', ks, cost)
    redis.call('EXPIRE', ks, tonumber(ARGV[b + 1]))
  end
end
return 1
