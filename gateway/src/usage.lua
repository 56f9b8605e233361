-- Tollgate usage: add one batch of a key's usage to its daily, monthly and total counters,
-- exactly once. A batch whose outcome the gateway could not see (a timeout while Redis
-- stalled) is sent again with the same id; its marker makes the second run a no-op.
--
-- Once the gateway has seen a batch confirmed it sends no retry of it, so the next batch
-- of the same counters deletes that batch's marker: markers do not pile up.
--
-- KEYS: batch marker, day counters, month counters, total counters, the marker of the
--       previous confirmed batch (all one hash slot).
-- ARGV: requests, input tokens, output tokens, spend, day ttl s, month ttl s,
--       marker ttl ms, then the field names: requests, input, output, spend; then '1'
--       when KEYS[5] is to be deleted.
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[7]) then return 0 end
if ARGV[12] == '1' then redis.call('DEL', KEYS[5]) end
for i = 2, 4 do
  local k = KEYS[i]
  redis.call('HINCRBY', k, ARGV[8], ARGV[1])
  redis.call('HINCRBY', k, ARGV[9], ARGV[2])
  redis.call('HINCRBY', k, ARGV[10], ARGV[3])
  redis.call('HINCRBYFLOAT', k, ARGV[11], ARGV[4])
  if i == 2 then redis.call('EXPIRE', k, ARGV[5]) else redis.call('EXPIRE', k, ARGV[6]) end
end
return 1
