-- wrk script of `make bench-tracking`: each request is $HITS page views (one object, or
-- an array of them) of the site $SITE, posted to $TRACK_PATH. URLs, users and contexts
-- vary; every number has a fixed width, so every request has the same length and is
-- one template filled with string.format (wrk shares the cores with the servers).
local site, hits, path = os.getenv("SITE"), tonumber(os.getenv("HITS")), os.getenv("TRACK_PATH")
math.randomseed(os.time() + os.clock() * 1e6)

local hit = '{"site_id":"' .. site .. '","url":"https://bench.example/p/%05d",'
  .. '"context":["c%02d","c%02d","c%02d"],"user":{"id":"u%06d","device":"Mozilla Firefox"}}'
local body = hit
if hits > 1 then
  local all = {}
  for i = 1, hits do all[i] = hit end
  body = "[" .. table.concat(all, ",") .. "]"
end
local template

function init(args)
  local length = #string.format(hit, 0, 0, 0, 0, 0)
  if hits > 1 then length = hits * length + hits + 1 end
  local head = wrk.format("POST", path, { ["Content-Type"] = "application/json" })
  template = head:sub(1, -3) .. "Content-Length: " .. length .. "\r\n\r\n" .. body
end

local args = {}
request = function()
  for i = 0, hits - 1 do
    args[i * 5 + 1] = math.random(0, 99999)
    args[i * 5 + 2] = math.random(0, 33)
    args[i * 5 + 3] = math.random(34, 66)
    args[i * 5 + 4] = math.random(67, 99)
    args[i * 5 + 5] = math.random(0, 999999)
  end
  return string.format(template, (table.unpack or unpack)(args, 1, hits * 5))
end
