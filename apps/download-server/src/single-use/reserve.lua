-- reserve(KEYS[1] = the jti's record; ARGV = start, end, ttl ms, maxBytes, maxResponses)
-- The rule of `decide` (policy.ts) and the write, as one atomic step across every replica: Redis
-- runs one script at a time. A record is a hash: `r` the ranges (`s-e,s-e`, half-open, sorted,
-- merged), `b` the bytes counted, `n` the responses. Answers 'ok', or the refusal.
local start, stop = tonumber(ARGV[1]), tonumber(ARGV[2])
local record = redis.call('HMGET', KEYS[1], 'r', 'b', 'n')
local bytes, responses = tonumber(record[2]) or 0, tonumber(record[3]) or 0
local ranges = {}
if record[1] then
  for s, e in string.gmatch(record[1], '(%d+)-(%d+)') do
    s, e = tonumber(s), tonumber(e)
    if s < stop and start < e then return 'overlap' end
    ranges[#ranges + 1] = { s, e }
  end
end
if responses >= tonumber(ARGV[5]) then return 'responses' end
if bytes + (stop - start) > tonumber(ARGV[4]) then return 'bytes' end
local parts = {}
local placed = false
local s, e = start, stop
for _, r in ipairs(ranges) do
  if r[2] < s then
    parts[#parts + 1] = string.format('%d-%d', r[1], r[2])
  elseif r[1] > e then
    if not placed and s < e then parts[#parts + 1] = string.format('%d-%d', s, e) end
    placed = true
    parts[#parts + 1] = string.format('%d-%d', r[1], r[2])
  else
    s, e = math.min(s, r[1]), math.max(e, r[2])
  end
end
if not placed and s < e then parts[#parts + 1] = string.format('%d-%d', s, e) end
redis.call('HSET', KEYS[1], 'r', table.concat(parts, ','), 'b', string.format('%d', bytes + stop - start), 'n', responses + 1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 'ok'
