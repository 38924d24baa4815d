// One autocannon run against a JSON endpoint, with request bodies rotating over a list; prints one JSON line.
//
//     node bench/autocannon_run.js CONFIG.json        (install first: npm ci --prefix bench)
//
// CONFIG: {"url": "http://127.0.0.1:PORT", "path": "/v1/classify", "bodies": ["{...}", ...],
//          "connections": 16, "duration": 10, "overallRate": null, "timeout": 10}
// bench/serve.py writes the config and reads the output; nothing here knows about distill.
//
// Why this and not the autocannon CLI: the CLI sends one body for the whole run (every request would hit
// the same text, and any cache), and its latency histogram counts whole milliseconds (hdr-histogram with
// integer buckets), too coarse for a 1 ms overhead target. Here each connection cycles through one
// prebuilt request per body (autocannon builds them once, so rotating costs the client nothing per
// request), and every 2xx response time is kept as a float (autocannon measures it with process.hrtime)
// for our own percentiles.
'use strict'

const fs = require('fs')
const autocannon = require('autocannon')

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'))
const requests = cfg.bodies.map((body) => ({
  method: 'POST',
  path: cfg.path,
  headers: { 'content-type': 'application/json' },
  body
}))

// float milliseconds of every 2xx answer; grown by doubling (a 10-minute soak is a few hundred thousand)
let lat = new Float64Array(1 << 16)
let n = 0
const cpu0 = process.cpuUsage()

const instance = autocannon({
  url: cfg.url,
  connections: cfg.connections,
  duration: cfg.duration,
  timeout: cfg.timeout || 10,
  // a fixed request rate over all connections (the soak); null = as fast as answers come (closed loop)
  ...(cfg.overallRate ? { overallRate: cfg.overallRate } : {}),
  requests
}, (err, result) => {
  if (err) {
    console.error(err)
    process.exit(1)
  }
  const cpu = process.cpuUsage(cpu0)
  const v = lat.subarray(0, n).sort()
  const pct = (q) => (n ? v[Math.min(n - 1, Math.round(q * (n - 1)))] : null)
  let sum = 0
  for (let i = 0; i < n; i++) sum += v[i]
  const L = result.latency
  console.log(JSON.stringify({
    connections: cfg.connections,
    overall_rate: cfg.overallRate || null,
    duration_s: result.duration,
    requests_2xx: n,
    requests_per_s: n / result.duration,
    latency_ms: { p50: pct(0.5), p90: pct(0.9), p99: pct(0.99), mean: n ? sum / n : null, max: n ? v[n - 1] : null },
    // autocannon's own histogram (whole ms; corrected for coordinated omission when a rate is set)
    autocannon_latency_ms: { p50: L.p50, p90: L.p90, p99: L.p99, max: L.max },
    errors: result.errors,
    timeouts: result.timeouts,
    non2xx: result.non2xx,
    resets: result.resets,
    status_codes: result.statusCodeStats,
    // the load generator's own CPU: on a machine where it shares cores with the server this is what it took
    client_cpu_seconds: (cpu.user + cpu.system) / 1e6
  }))
})

instance.on('response', (client, statusCode, resBytes, responseTime) => {
  if (statusCode < 200 || statusCode >= 300) return
  if (n === lat.length) {
    const bigger = new Float64Array(lat.length * 2)
    bigger.set(lat)
    lat = bigger
  }
  lat[n++] = responseTime
})
