-- wrk script: single-message publishes spread over several topics, in turn.
-- wrk -s bench/wrk/publish_topics.lua -c 16 -d 10s http://127.0.0.1:8000 -- <prefix> <count>
-- publishes to <prefix>0 .. <prefix><count - 1> (every topic must exist).
local prefix = "wrk"
local count = 16
local i = 0
local headers = { ["Content-Type"] = "application/json" }
local body = '{"messages":[{"value":{"order_id":42,"total":19.9,"customer":"c-7"}}]}'

function init(args)
  if args[1] ~= nil then prefix = args[1] end
  if args[2] ~= nil then count = tonumber(args[2]) end
end

function request()
  i = i + 1
  return wrk.format("POST", "/v1/topics/" .. prefix .. (i % count) .. "/messages", headers, body)
end

function response(status, headers, body)
  if status ~= 201 and status ~= 200 then
    io.stderr:write("unexpected status " .. status .. ": " .. body .. "\n")
  end
end
