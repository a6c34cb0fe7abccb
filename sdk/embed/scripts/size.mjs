// Print the bundle's raw and gzip sizes; exit 1 when the gzip size is over the budget (25 KiB).
import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

const BUDGET = 25600;
const file = resolve(dirname(fileURLToPath(import.meta.url)), "../dist/firstmile.js");
let raw;
try {
  raw = readFileSync(file);
} catch {
  console.error(`${file} is missing: run npm run build first`);
  process.exit(1);
}
const gzip = gzipSync(raw, { level: 9 }).length;
console.log(`dist/firstmile.js: ${raw.length} bytes raw, ${gzip} bytes gzip (budget ${BUDGET} bytes gzip)`);
if (gzip > BUDGET) {
  console.error(`over budget by ${gzip - BUDGET} bytes`);
  process.exit(1);
}
