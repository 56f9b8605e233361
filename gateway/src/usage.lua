-- Tollgate usage: add one batch of a key's usage to its daily, monthly and total counters,
-- exactly once. A batch whose outcome the gateway could not see (a timeout while Redis
-- stalled) is sent again with the same id; its marker makes the second run a no-op.
--
-- Once the gateway has seen a batch confirmed it sends no retry of it, so the next batch
-- of the same counters deletes that batch's marker: markers do not pile up.
--
-- KEYS: batch marker, day counters, month counters, total counters, the marker of the
--       previous confirmed batch (all one hash slot).
-- ARGV: day ttl s, month ttl s, marker ttl ms, '1' when KEYS[5] is to be deleted, the
--       spend field name and the spend, then pairs of an integer counter's field name and
--       its increment (requests, input and output tokens, cached and cache-write tokens;
--       those at 0 left out).
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[3]) then return 0 end
if ARGV[4] == '1' then redis.call('DEL', KEYS[5]) end
for i = 2, 4 do
  local k = KEYS[i]
  for j = 7, #ARGV, 2 do
    redis.call('HINCRBY', k, ARGV[j], ARGV[j + 1])
  end
  redis.call('HINCRBYFLOAT', k, ARGV[5], ARGV[6])
  if i == 2 then redis.call('EXPIRE', k, ARGV[1]) else redis.call('EXPIRE', k, ARGV[2]) end
end
return 1
