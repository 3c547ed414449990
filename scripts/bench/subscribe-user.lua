-- wrk script: POST /subscribe-user with the document's example, a new pk, email, phone and
-- request id on every call (so every call is a real change: profile, four consents, address
-- forms). Arguments: the Basic credentials, then the round (1, 2, ...): each round of a run
-- uses its own pks and phones, so a later round repeats none of an earlier one's calls.
local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

local template = [[{"pk": %d, "username": "username", "firstName": "Test", "lastName": "User",
"email": "user%d@example.com", "phone": "0535%07d", "gender": "M", "dateOfBirth": "1990-01-01",
"languageCode": "tr", "emailAllowed": true, "smsAllowed": true, "callAllowed": true,
"whatsappAllowed": false, "isActive": true, "isStaff": false, "userType": "registered",
"attributes": {"logged_ip": "127.0.0.1"}, "dateJoined": "2024-01-01T00:00:00Z",
"lastLogin": "2024-06-01T00:00:00Z", "modifiedDate": "2024-06-01T00:00:00Z"}]]

function init(args)
  auth = args[1]
  round = tonumber(args[2] or "1")
end

function request()
  counter = counter + 1
  local pk = round * 100000000 + tid * 10000000 + counter
  -- Seven digits: 5,000,000 per wrk thread, 1,000,000 per round (rounds 1-5 never collide).
  local phone = ((tid - 1) * 5000000 + (round - 1) * 1000000 + counter) % 10000000
  local body = string.format(template, pk, pk, phone)
  return wrk.format("POST", "/subscribe-user", {
    ["Authorization"] = "Basic " .. auth,
    ["x-akinon-request-id"] = "bench-" .. pk,
    ["x-akinon-api-version"] = "2",
    ["Content-Type"] = "application/json",
  }, body)
end

done = function(summary, latency, requests)
  local non2xx = summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT rps=%.0f p50_ms=%.2f p99_ms=%.2f requests=%d errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, summary.requests, non2xx))
end
