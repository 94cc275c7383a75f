// Perplexity of GGUF files in real llama.cpp (node-llama-cpp's prebuilt CPU build) on given token
// windows, the same windows for every file: each token's probability given the ones before it in its window.
// Each window is evaluated in one batch (prompt-processing speed); at every position llama.cpp returns only
// the logit of the text's next token, the largest logit and sum(exp(logit - largest)), so no
// vocabulary-sized map crosses into JavaScript: log p = logit - largest - log(sum).
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
    const sequence = context.getSequence();
    const raw = {temperature: 1, topK: 0, topP: 1, minP: 0};  // the model's own distribution, untouched
    for (const window of windows) {
        await sequence.clearHistory();
        const input = window.map((token, i) => i + 1 < window.length ? [token, {generateNext: {
            logits: {filter: {tokens: [window[i + 1]], includeTop: 1}}, totalLogitWeight: true, options: raw}}]
            : token);
        const output = await sequence.controlledEvaluate(input);
        for (let i = 0; i + 1 < window.length; i++) {
            const {logits, totalLogitWeight} = output[i].next;
            const largest = Math.max(...logits.values());  // the top token's (includeMax returns nothing)
            nll -= logits.get(window[i + 1]) - largest - Math.log(totalLogitWeight);
            tokens++;
        }
    }
    results.push({file, nll, tokens, perplexity: Math.exp(nll / tokens)});
    await context.dispose();
    await model.dispose();
}
console.log(JSON.stringify(results));
