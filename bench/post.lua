-- wrk script: POST the benchmark intent with a unique Idempotency-Key per request.
-- env: BENCH_PATH, BENCH_KEY (API key; empty for the baseline)
local path = os.getenv("BENCH_PATH") or "/internal/notifications"
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local run = os.getenv("BENCH_RUN") or tostring(os.time())   -- unique per wrk run: keys never repeat across runs
local key = os.getenv("BENCH_KEY") or ""
local counter = 0
local thread_id = 0
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end

function init(args)
  thread_id = id or 0
end

function request()
  counter = counter + 1
  local n = counter % 1000
  local body = '{"recipient":{"ref":"member-' .. n .. '","addresses":{"email":"member' .. n .. '@example.com"}},' ..
               '"channels":["email"],"template":"event_reminder","variables":{"name":"Ana","event":"Long run"}}'
  local headers = {["Content-Type"] = "application/json",
                   ["Idempotency-Key"] = "bench-" .. run .. "-" .. thread_id .. "-" .. counter}
  if key ~= "" then headers["Authorization"] = "Bearer " .. key end
  return wrk.format("POST", path, headers, body)
end

-- An open-ish pace for the latency scenario: each connection waits BENCH_DELAY_MS between requests.
function delay()
  return delay_ms
end
