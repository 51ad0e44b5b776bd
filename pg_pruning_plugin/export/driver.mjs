// node-llama-cpp driver of pg_pruning_plugin.export.llama_cpp: greedy decoding with logits.
// argv: <folder with node_modules/node-llama-cpp> <request.json>; prints {"results": [...]} as JSON.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";
import path from "node:path";
const [dir, reqFile] = process.argv.slice(2);
const req = JSON.parse(readFileSync(reqFile, "utf8"));
const lib = await import(pathToFileURL(path.join(dir, "node_modules/node-llama-cpp/dist/index.js")).href);
const llama = await lib.getLlama({ gpu: false, build: "never", skipDownload: true, maxThreads: req.threads,
                                   logLevel: lib.LlamaLogLevel.error, progressLogs: false });
const model = await llama.loadModel({ modelPath: req.model, gpuLayers: 0 });
const results = [];
for (const prompt of req.prompts) {
  const ctx = await model.createContext({ contextSize: req.context_size, threads: req.threads,
                                         experimentalKvCacheKeyType: req.kv_cache,
                                         experimentalKvCacheValueType: req.kv_cache,
                                         flashAttention: req.flash_attention });
  const seq = ctx.getSequence();
  let input = prompt.map((t, i) => (i === prompt.length - 1 ? [t, { generateNext: { logits: true } }] : t));
  const generated = [], steps = [];
  for (let s = 0; s < req.n_predict; s++) {
    const res = await seq.controlledEvaluate(input);
    const logits = res[res.length - 1].next.logits;
    let best = -1, bestValue = -Infinity;
    const dense = req.return_logits ? new Array(logits.size) : null;
    for (const [token, value] of logits) {
      if (value > bestValue) { bestValue = value; best = token; }
      if (dense) dense[token] = value;
    }
    generated.push(best);
    if (dense) steps.push(dense);
    input = [[best, { generateNext: { logits: true } }]];
  }
  results.push({ generated, logits: req.return_logits ? steps : null });
  await ctx.dispose();
}
process.stdout.write(JSON.stringify({ results }));
await model.dispose();
await llama.dispose();
