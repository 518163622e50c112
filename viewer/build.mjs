// Builds the viewer and the self-hosted GraphiQL page into ../app/static (or the folder given
// as the first argument). Output names carry no hashes and no timestamps: the same sources give
// the same bytes, so a test can rebuild and compare with what is committed.
import { copyFile, mkdir, rm } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(process.argv[2] ?? join(here, "..", "app", "static"));

const common = {
  bundle: true,
  minify: true,
  target: "es2022",
  charset: "utf8",
  legalComments: "external",
  logLevel: "warning",
  define: { "process.env.NODE_ENV": '"production"' },
  loader: { ".woff2": "file", ".woff": "file" },
  assetNames: "[name]",
};

await rm(out, { recursive: true, force: true });
await mkdir(join(out, "viewer"), { recursive: true });
await mkdir(join(out, "graphiql"), { recursive: true });

await esbuild.build({
  ...common,
  entryPoints: { app: "src/main.tsx", "md5-worker": "src/md5-worker.ts" },
  outdir: join(out, "viewer"),
  format: "esm",
  jsx: "automatic",
  jsxImportSource: "preact",
});
await esbuild.build({
  ...common,
  entryPoints: { graphiql: "src/graphiql.tsx" },
  outdir: join(out, "graphiql"),
  format: "iife",
  jsx: "automatic",
  jsxImportSource: "react",
});
await copyFile(join(here, "src", "viewer.html"), join(out, "viewer", "index.html"));
await copyFile(join(here, "src", "graphiql.html"), join(out, "graphiql", "index.html"));
