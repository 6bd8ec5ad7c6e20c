-- wrk script of `make bench-webhook`: every request is a new NEW_MESSAGE for one of the
-- conversations listed (one id per line) in the file named by $CONVERSATIONS.
local conversations = {}
for line in io.lines(os.getenv("CONVERSATIONS")) do
  conversations[#conversations + 1] = line
end
math.randomseed(os.time() + os.clock() * 1e6)

local function hex(n)
  local s = ""
  for _ = 1, n do s = s .. string.format("%x", math.random(0, 15)) end
  return s
end

local function uuid()
  return hex(8) .. "-" .. hex(4) .. "-4" .. hex(3) .. "-a" .. hex(3) .. "-" .. hex(12)
end

request = function()
  local body = string.format(
    '{"type":"NEW_MESSAGE","timestamp":"2026-01-01T10:00:00.000001","data":{"id":"%s","direction":"SENT","content":"Tudo ótimo e você?","conversation_id":"%s"}}',
    uuid(), conversations[math.random(#conversations)])
  return wrk.format("POST", "/webhook/", { ["Content-Type"] = "application/json" }, body)
end
