-- wrk script of `make bench-webhook`: every request is a new NEW_MESSAGE for one of the
-- conversations listed (one id per line) in the file named by $CONVERSATIONS.
local conversations = {}
for line in io.lines(os.getenv("CONVERSATIONS")) do
  conversations[#conversations + 1] = line
end
math.randomseed(os.time() + os.clock() * 1e6)

-- A random version 4 UUID in five calls (the load generator shares the cores with the
-- servers it measures, so it should cost them as little as possible).
local function uuid()
  return string.format("%08x-%04x-4%03x-a%03x-%06x%06x",
    math.random(0, 0x7fffffff), math.random(0, 0xffff), math.random(0, 0xfff),
    math.random(0, 0xfff), math.random(0, 0xffffff), math.random(0, 0xffffff))
end

request = function()
  local body = string.format(
    '{"type":"NEW_MESSAGE","timestamp":"2026-01-01T10:00:00.000001","data":{"id":"%s","direction":"SENT","content":"Tudo ótimo e você?","conversation_id":"%s"}}',
    uuid(), conversations[math.random(#conversations)])
  return wrk.format("POST", "/webhook/", { ["Content-Type"] = "application/json" }, body)
end
