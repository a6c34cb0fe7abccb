// Drives one official Node.js tracking library against a host, as an application would, and reports what the
// library said: `node send.mjs '<json>'` with {library: "segment"|"rudderstack", host, writeKey, gzip, skewMs,
// calls: [{method, message}]}; prints {"callbacks": n, "errors": [...]} (every per-call callback's error, and
// every error the library emitted) on stdout. skewMs moves this process's clock (the library's `new Date()`
// and `Date.now()`), as on a device whose clock is wrong.
const config = JSON.parse(process.argv[2]);

if (config.skewMs) {
  const RealDate = Date;
  const skew = config.skewMs;
  class SkewedDate extends RealDate {
    constructor(...args) {
      if (args.length === 0) {
        super(RealDate.now() + skew);
      } else {
        super(...args);
      }
    }
    static now() {
      return RealDate.now() + skew;
    }
  }
  globalThis.Date = SkewedDate;
}

const errors = [];
let callbacks = 0;
const describe = (err) => {
  const status = err?.response?.status ?? err?.code ?? '';
  return `${status} ${err?.message ?? err}`.trim();
};
const done = (err) => {
  callbacks += 1;
  if (err) errors.push(describe(err));
};

if (config.library === 'segment') {
  const { Analytics } = await import('@segment/analytics-node');
  const analytics = new Analytics({ writeKey: config.writeKey, host: config.host, maxRetries: 0 });
  analytics.on('error', (err) => errors.push(describe(err)));
  for (const { method, message } of config.calls) {
    analytics[method](message, done);
  }
  await analytics.closeAndFlush({ timeout: 20000 });
} else if (config.library === 'rudderstack') {
  const { default: Analytics } = await import('@rudderstack/rudder-sdk-node');
  const analytics = new Analytics(config.writeKey, {
    dataPlaneUrl: config.host,
    gzip: Boolean(config.gzip),
    retryCount: 0,
    logLevel: 'error',
    errorHandler: (err) => errors.push(describe(err)),
  });
  for (const { method, message } of config.calls) {
    analytics[method](message, done);
  }
  await analytics.flush();
  // the callbacks run on setImmediate after the batch's answer
  await new Promise((resolve) => setTimeout(resolve, 50));
} else {
  throw new Error(`unknown library ${config.library}`);
}

process.stdout.write(JSON.stringify({ callbacks, errors }));
