-- wrk script: single-message publishes to one topic (one request = one message).
-- wrk -s bench/wrk/publish.lua -c 16 -d 10s http://127.0.0.1:8000 -- <topic>
local topic = "wrk"

function init(args)
  if args[1] ~= nil then topic = args[1] end
  wrk.method = "POST"
  wrk.path = "/v1/topics/" .. topic .. "/messages"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = '{"messages":[{"value":{"order_id":42,"total":19.9,"customer":"c-7"}}]}'
end

function response(status, headers, body)
  if status ~= 201 and status ~= 200 then
    io.stderr:write("unexpected status " .. status .. ": " .. body .. "\n")
  end
end
