// Bundles src/main.ts with the Firebase JS SDK into dist/ (offline: everything comes from node_modules),
// beside the static files of public/. `npm run build` type-checks first; Hosting serves dist/.
import { build } from "esbuild";
import { cpSync, mkdirSync, rmSync } from "node:fs";

const dist = new URL("./dist/", import.meta.url);
rmSync(dist, { recursive: true, force: true });
mkdirSync(dist, { recursive: true });
cpSync(new URL("./public/", import.meta.url), dist, { recursive: true });
await build({
  entryPoints: [new URL("./src/main.ts", import.meta.url).pathname],
  bundle: true,
  format: "esm",
  // The browsers the page is built for (the Firebase JS SDK's own floor is ES2020): syntax newer than theirs is
  // rewritten. An older browser gets public/boot.js's message, not a page stuck at "Signing in…".
  target: ["es2020", "chrome100", "edge100", "firefox100", "safari15"],
  minify: true,
  sourcemap: true,
  legalComments: "linked",
  outfile: new URL("./dist/app.js", import.meta.url).pathname,
  logLevel: "warning",
});
