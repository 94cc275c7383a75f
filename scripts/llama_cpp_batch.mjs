// Many GGUF files in one llama.cpp process (node-llama-cpp's prebuilt CPU build): starting llama.cpp
// costs seconds, a tiny model milliseconds. For each job, the next-token probabilities teacher-forced
// along prompt + continuation, a greedy generation from the prompt, and llama.cpp's tokens for a text.
//   node llama_cpp_batch.mjs JOBS.json
//   JOBS: [{"file", "prompt": [ids], "continuation": [ids], "generate": n, "text": "to tokenize"}]
// Prints one JSON list: [{"file", "probs": [[p_0 ... p_vocab-1] ...], "generated": [ids], "tokens": [ids]}].
import {readFileSync} from "node:fs";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const jobs = JSON.parse(readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
// llama.cpp's log reaches node asynchronously: after a failed load, wait for its words before node exits
const load = (file) => llama.loadModel({modelPath: file}).catch(async (e) => {
    await new Promise((done) => setTimeout(done, 500));
    throw e;
});
const results = [];
for (const {file, prompt, continuation = [], generate = 0, text = ""} of jobs) {
    const model = await load(file);
    const vocab = model.fileInfo.metadata.tokenizer.ggml.tokens.length;
    const context = await model.createContext({contextSize: 256, batchSize: 256, sequences: 2, threads: 1});
    const probs = [];
    // yieldEogToken: a sampled end-of-generation token must not end the walk (without it, it silently does)
    const steps = context.getSequence().evaluateWithMetadata(prompt, {probabilities: true},
        {temperature: 1, topK: 0, topP: 1, seed: 0, yieldEogToken: true});
    let next = await steps.next();
    for (let i = 0; !next.done; i++) {
        const row = new Array(vocab).fill(0);
        for (const [token, p] of next.value.probabilities) row[token] = p;
        probs.push(row);
        if (i >= continuation.length) break;
        next = await steps.next(continuation[i]);  // feed our token instead of the sampled one
    }
    await steps.return();
    const generated = [];
    if (generate > 0) {
        for await (const token of context.getSequence().evaluate(prompt, {temperature: 0, yieldEogToken: true})) {
            generated.push(token);
            if (generated.length >= generate) break;
        }
    }
    results.push({file, probs, generated, tokens: Array.from(model.tokenize(text))});
    await context.dispose();
    await model.dispose();
}
console.log(JSON.stringify(results));
