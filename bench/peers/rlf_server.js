// The peer `make bench-peers` measures the sidecar against: Node's rate-limiter-flexible
// over ioredis, as its users deploy it for "may this call go ahead?". POST /v1/check with
// the same JSON body the sidecar's bench sends; one key (the body's user_id) consumes one
// point per check and the answer is a short JSON object. The limit never denies, so every
// answer is a 200 and the figure is a decision rate, as the sidecar's is.
//
//   node rlf_server.js --port 8790 --redis-url redis://127.0.0.1:6379/0
//
// Binds 127.0.0.1 only; stops on SIGTERM (the bench stops it by its pid).
'use strict';

const http = require('node:http');
const Redis = require('ioredis');
const { RateLimiterRedis } = require('rate-limiter-flexible');

function arg(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const port = Number(arg('--port', '8790'));
const redis = new Redis(arg('--redis-url', 'redis://127.0.0.1:6379/0'), {
  enableOfflineQueue: true,
  maxRetriesPerRequest: 1,
});
const limiter = new RateLimiterRedis({
  storeClient: redis,
  keyPrefix: 'rlf',
  points: 1e12, // never denies: the bench measures the decision, not denials
  duration: 86400,
});

function answer(res, status, body) {
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(body),
  });
  res.end(body);
}

const server = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/healthz') {
    answer(res, 200, '{"status":"ok"}');
    return;
  }
  if (req.method !== 'POST' || req.url !== '/v1/check') {
    answer(res, 404, '{"error":"not found"}');
    return;
  }
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    let key;
    try {
      key = JSON.parse(Buffer.concat(chunks).toString('utf8')).user_id;
    } catch {
      key = undefined;
    }
    if (typeof key !== 'string' || key === '') {
      answer(res, 400, '{"error":"user_id"}');
      return;
    }
    limiter.consume(key, 1).then(
      (r) => answer(res, 200, `{"allowed":true,"remaining":${r.remainingPoints}}`),
      (r) => {
        if (r instanceof Error) answer(res, 503, '{"error":"redis"}');
        else answer(res, 429, '{"allowed":false}');
      },
    );
  });
});

server.keepAliveTimeout = 65000;
server.listen(port, '127.0.0.1');
process.on('SIGTERM', () => {
  server.close();
  redis.disconnect();
  process.exit(0);
});
