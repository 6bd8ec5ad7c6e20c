-- wrk script of `make bench-webhook`: every request is a new NEW_MESSAGE for one of the
-- conversations listed (one id per line) in the file named by $CONVERSATIONS.
local conversations = {}
for line in io.lines(os.getenv("CONVERSATIONS")) do
  conversations[#conversations + 1] = line
end
math.randomseed(os.time() + os.clock() * 1e6)

-- The load generator shares the cores with the servers it measures, so each request
-- costs it one string.format: every request has the same length (a UUID is always 36
-- characters, and so is each conversation id), so the whole request, headers and
-- Content-Length included, is one template with the message id's five random parts and
-- the conversation id as its holes.
local body = '{"type":"NEW_MESSAGE","timestamp":"2026-01-01T10:00:00.000001","data":{"id":"%08x-%04x-4%03x-a%03x-%06x%06x","direction":"SENT","content":"Tudo ótimo e você?","conversation_id":"%s"}}'
local template

-- After wrk's own init has set the Host header.
function init(args)
  local length = #string.format(body, 0, 0, 0, 0, 0, 0, conversations[1])
  local head = wrk.format("POST", "/webhook/", { ["Content-Type"] = "application/json" })
  -- wrk.format ends the head with an empty line; Content-Length goes before it.
  template = head:sub(1, -3) .. "Content-Length: " .. length .. "\r\n\r\n" .. body
end

request = function()
  return string.format(template,
    math.random(0, 0x7fffffff), math.random(0, 0xffff), math.random(0, 0xfff),
    math.random(0, 0xfff), math.random(0, 0xffffff), math.random(0, 0xffffff),
    conversations[math.random(#conversations)])
end
