// Speed of GGUF files in real llama.cpp (node-llama-cpp's prebuilt CPU build), batch 1: prompt processing
// (a prompt of N random token ids evaluated in one batch) and generation (M tokens greedily after it).
// Every file is loaded once; the turns alternate between the files (a, b, a, b, ...) so that the machine's
// drifts hit them alike. The prompt ids come from a seeded generator: the same ids for every file.
//   node llama_cpp_speed.mjs JOBS.json
//   JOBS: {"files": [paths], "seqlens": [N, ...], "generate": M, "repeats": R, "threads": T, "seed": S}
// Prints one JSON object: {"llama_cpp", "threads", "results": [{"file", "index" (in files), "seqlen",
// "prompt_seconds": [R], "generate_seconds": [R], "generated": tokens generated per turn}]}.
import {readFileSync} from "node:fs";
import {performance} from "node:perf_hooks";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const {files, seqlens, generate, repeats, threads, seed = 0} = JSON.parse(readFileSync(process.argv[2], "utf8"));
// maxThreads 0: no cap of node-llama-cpp's own, so `threads` is the number llama.cpp really uses
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error, maxThreads: 0});
// llama.cpp's log reaches node asynchronously: after a failed load, wait for its words before node exits
const load = (file) => llama.loadModel({modelPath: file}).catch(async (e) => {
    await new Promise((done) => setTimeout(done, 500));
    throw e;
});
const longest = Math.max(...seqlens);
const loaded = [];
for (const file of files) {
    const model = await load(file);
    const context = await model.createContext({contextSize: longest + generate + 8, batchSize: longest,
                                               sequences: 1, threads});
    loaded.push({file, model, context, sequence: context.getSequence(),
                 vocab: model.fileInfo.metadata.tokenizer.ggml.tokens.length});
}

function random(state) {  // mulberry32: a small seeded generator, the same numbers on every machine
    return () => {
        state = (state + 0x6d2b79f5) | 0;
        let t = Math.imul(state ^ (state >>> 15), 1 | state);
        t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
        return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
}

const vocab = Math.min(...loaded.map((m) => m.vocab));
async function turn({sequence}, prompt) {
    // The first step evaluates the whole prompt (one batch) and samples a token; each later step evaluates
    // one token and samples the next: that is generation. Greedy, end-of-generation tokens included.
    await sequence.clearHistory();
    const steps = sequence.evaluate(prompt, {temperature: 0, yieldEogToken: true});
    const start = performance.now();
    await steps.next();
    const prompted = performance.now();
    let generated = 0;
    while (generated < generate && !(await steps.next()).done) generated++;
    const end = performance.now();
    await steps.return();
    return {prompt: (prompted - start) / 1000, generate: (end - prompted) / 1000, generated};
}

const results = [];
for (const seqlen of seqlens) {
    const next = random(seed + seqlen);
    const prompt = Array.from({length: seqlen}, () => 3 + Math.floor(next() * (vocab - 3)));
    const rows = loaded.map(({file}, index) => ({file, index, seqlen, prompt_seconds: [], generate_seconds: [],
                                                  generated: 0}));
    for (const m of loaded) await turn(m, prompt);  // warm-up: pages the weights in, sizes the buffers
    for (let r = 0; r < repeats; r++) {
        for (let i = 0; i < loaded.length; i++) {
            const t = await turn(loaded[i], prompt);
            rows[i].prompt_seconds.push(t.prompt);
            rows[i].generate_seconds.push(t.generate);
            rows[i].generated = t.generated;
        }
    }
    results.push(...rows);
}
const release = llama.llamaCppRelease;
console.log(JSON.stringify({llama_cpp: `${release.repo}@${release.release}`, threads: loaded[0].context.currentThreads,
                            results}));
for (const m of loaded) {
    await m.context.dispose();
    await m.model.dispose();
}
