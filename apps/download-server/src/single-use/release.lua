-- release(KEYS[1] = the jti's record; ARGV = from, end, unsent, responses)
-- Gives [from, end) back, takes `unsent` off the bytes and `responses` off the responses
-- (policy.ts, `ReplayStore.release`). Leaves the TTL alone, does nothing on an expired record,
-- and deletes a record with nothing left in it: an empty record is no record.
local record = redis.call('HMGET', KEYS[1], 'r', 'b', 'n')
if not record[3] then return 0 end
local from, stop = tonumber(ARGV[1]), tonumber(ARGV[2])
local parts = {}
for s, e in string.gmatch(record[1] or '', '(%d+)-(%d+)') do
  s, e = tonumber(s), tonumber(e)
  if e <= from or s >= stop then
    parts[#parts + 1] = string.format('%d-%d', s, e)
  else
    if s < from then parts[#parts + 1] = string.format('%d-%d', s, from) end
    if e > stop then parts[#parts + 1] = string.format('%d-%d', stop, e) end
  end
end
local bytes = math.max(0, (tonumber(record[2]) or 0) - tonumber(ARGV[3]))
local responses = math.max(0, tonumber(record[3]) - tonumber(ARGV[4]))
if #parts == 0 and bytes == 0 and responses == 0 then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'r', table.concat(parts, ','), 'b', string.format('%d', bytes), 'n', responses)
end
return 1
