-- wrk script: single-message consume, a pull of one message then its ack in a request of
-- its own (the bench's `consume b1` row).
-- wrk -s bench/wrk/consume.lua -c 4 -d 10s http://127.0.0.1:8000 -- <topic> <subscription>
-- The connections of a thread share its receipts: a pull's receipt is acked by whichever
-- connection sends next, so every request is a pull or an ack and no connection idles.
-- done() prints "acked <n>", the messages pulled and acked while wrk ran.
local base = "/v1/topics/wrk/subscriptions/s"
local receipts = {}
acked = 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  if args[1] ~= nil and args[2] ~= nil then
    base = "/v1/topics/" .. args[1] .. "/subscriptions/" .. args[2]
  end
end

local headers = { ["Content-Type"] = "application/json" }
local pull_body = '{"max_messages":1}'

function request()
  local receipt = table.remove(receipts)
  if receipt ~= nil then
    return wrk.format("POST", base .. "/ack", headers, '{"receipts":["' .. receipt .. '"]}')
  end
  return wrk.format("POST", base .. "/pull", headers, pull_body)
end

function response(status, headers, body)
  if status ~= 200 then
    io.stderr:write("unexpected status " .. status .. ": " .. body .. "\n")
    return
  end
  local receipt = string.match(body, '"receipt":"([^"]+)"')
  if receipt ~= nil then
    table.insert(receipts, receipt)
    return
  end
  local count = string.match(body, '"acked":(%d+)')
  if count ~= nil then
    acked = acked + tonumber(count)
  end
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("acked")
  end
  io.write("acked " .. total .. "\n")
end
