// Bundle src/index.ts into dist/firstmile.js (IIFE, minified, ES2020) and copy it to where the API serves it
// (platform/firstmile/embed/firstmile.js, GET /embed/v1/firstmile.js).
import { copyFileSync, mkdirSync, readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const out = resolve(root, "dist/firstmile.js");
const served = resolve(root, "../../platform/firstmile/embed/firstmile.js");
const { version } = JSON.parse(readFileSync(resolve(root, "package.json"), "utf8"));

await build({
  entryPoints: [resolve(root, "src/index.ts")],
  outfile: out,
  bundle: true,
  format: "iife",
  minify: true,
  target: "es2020",
  platform: "browser",
  legalComments: "none",
  charset: "ascii", // non-ASCII as \u escapes: right whatever encoding the host page decodes scripts with
  banner: { js: `/*! Firstmile embed SDK ${version} | Apache-2.0 */` },
  logLevel: "warning",
});
mkdirSync(dirname(served), { recursive: true });
copyFileSync(out, served);
console.log(`built ${out}\ncopied to ${served}`);
