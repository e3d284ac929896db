// graphile-worker, the peer of bench/run.py scenario 8 (bench/limits.py runs it; installed by `npm ci` in bench/peers).
//   node graphile.mjs migrate <connection string>
//     installs graphile-worker's schema (graphile_worker) in that database.
//   node graphile.mjs drain <connection string> <jobs> <concurrency>
//     runs its worker with a no-op `noop` task over the jobs already queued, until <jobs> have succeeded, and prints
//     {"jobs", "failed", "seconds", "per_s"} on stdout, timed from the first job's start to the last completion.
import { EventEmitter } from "node:events";
import { performance } from "node:perf_hooks";

import { Logger, run, runMigrations } from "graphile-worker";

// Errors only: the default logger writes lines per job, which would cost the worker it measures.
const logger = new Logger(() => (level, message) => {
  if (level === "error") console.error(message);
});

const [command, connectionString, jobs, concurrency] = process.argv.slice(2);

if (command === "migrate") {
  await runMigrations({ connectionString, logger });
} else if (command === "drain") {
  await drain(Number(jobs), Number(concurrency));
} else {
  console.error("usage: node graphile.mjs migrate <url> | drain <url> <jobs> <concurrency>");
  process.exit(2);
}

async function drain(total, concurrency) {
  let first = null;
  let last = null;
  let succeeded = 0;
  let failed = 0;
  let finish;
  const finished = new Promise((resolve) => (finish = resolve));
  const events = new EventEmitter(); // listening before the runner starts: no job is missed
  events.on("job:start", () => {
    first ??= performance.now();
  });
  events.on("job:success", () => {
    succeeded += 1;
    last = performance.now();
    if (succeeded >= total) finish();
  });
  events.on("job:error", () => {
    failed += 1;
  });
  const runner = await run({
    connectionString,
    concurrency,
    noHandleSignals: true,
    logger,
    events,
    taskList: { noop: async () => {} },
  });
  const timeout = setTimeout(() => finish(), 900_000);
  await finished;
  clearTimeout(timeout);
  await runner.stop();
  const seconds = (last - first) / 1000;
  console.log(JSON.stringify({ jobs: succeeded, failed, seconds, per_s: succeeded / seconds }));
  if (succeeded < total) process.exit(1);
}
