// Perplexity of GGUF files in real llama.cpp (node-llama-cpp's prebuilt CPU build) on given token
// windows, the same windows for every file: each token's probability given the ones before it in its window.
//   node llama_cpp_perplexity.mjs JOBS.json    JOBS: {"files": [paths], "windows": [[ids], ...], "threads": n}
// Prints one JSON list: [{"file", "nll": summed negative log-likelihood, "tokens": tokens scored, "perplexity"}].
import {readFileSync} from "node:fs";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const {files, windows, threads = 1} = JSON.parse(readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
// llama.cpp's log reaches node asynchronously: after a failed load, wait for its words before node exits
const load = (file) => llama.loadModel({modelPath: file}).catch(async (e) => {
    await new Promise((done) => setTimeout(done, 500));
    throw e;
});
const results = [];
for (const file of files) {
    const model = await load(file);
    const longest = Math.max(...windows.map((w) => w.length));
    const context = await model.createContext({contextSize: longest + 8, batchSize: longest + 8, threads});
    let nll = 0, tokens = 0;
    for (const window of windows) {
        const sequence = context.getSequence();
        const steps = sequence.evaluateWithMetadata(window.slice(0, 1), {probabilities: true},
            {temperature: 1, topK: 0, topP: 1, seed: 0, yieldEogToken: true});
        let next = await steps.next();
        for (let i = 1; i < window.length && !next.done; i++) {
            const p = next.value.probabilities.get(window[i]) ?? 0;
            nll -= Math.log(Math.max(p, 1e-30));
            tokens++;
            next = await steps.next(window[i]);  // feed the text's token
        }
        await steps.return();
        sequence.dispose();
    }
    results.push({file, nll, tokens, perplexity: Math.exp(nll / tokens)});
    await context.dispose();
    await model.dispose();
}
console.log(JSON.stringify(results));
