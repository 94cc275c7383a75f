// Next-token probabilities from real llama.cpp (node-llama-cpp's prebuilt CPU build), teacher-forced
// along a given token sequence: the numerical check that a GGUF file written by `slicegpt export`
// computes the same function as the model it came from.
//   node llama_cpp_probs.mjs FILE.gguf '[prompt ids]' '[continuation ids]' ['text to tokenize']
// Prints one JSON object: {"probs": [[p_0 ... p_vocab-1] for the prompt's end and each continuation token],
// "tokens": llama.cpp's token ids for the text}.
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const [file, promptJson, continuationJson = "[]", text = ""] = process.argv.slice(2);
const prompt = JSON.parse(promptJson), continuation = JSON.parse(continuationJson);
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath: file});
const vocab = model.fileInfo.metadata.tokenizer.ggml.tokens.length;
const context = await model.createContext({contextSize: 256, batchSize: 256, threads: 1});
const sequence = context.getSequence();
const probs = [];
// yieldEogToken: a sampled end-of-generation token must not end the walk (without it, it silently does)
const steps = sequence.evaluateWithMetadata(prompt, {probabilities: true},
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
console.log(JSON.stringify({probs, tokens: Array.from(model.tokenize(text))}));
await context.dispose();
await model.dispose();
