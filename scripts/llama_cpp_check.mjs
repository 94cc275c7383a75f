// Greedy completion with real llama.cpp (node-llama-cpp's prebuilt CPU build): the check that a
// GGUF file written by `slicegpt export` loads and runs outside Python.
//   node scripts/llama_cpp_check.mjs FILE.gguf "prompt" [max tokens]
import {getLlama, LlamaCompletion, LlamaLogLevel} from "node-llama-cpp";

const [file, prompt = "To be, or not to be", maxTokens = "15"] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.warn});
// llama.cpp's log reaches node asynchronously: after a failed load, wait for its words before node exits
const load = (file) => llama.loadModel({modelPath: file}).catch(async (e) => {
    await new Promise((done) => setTimeout(done, 500));
    throw e;
});
const model = await load(file);
const meta = model.fileInfo.metadata;
const arch = meta.general?.architecture;
console.log(`llama.cpp ${llama.llamaCppRelease.release} (${llama.buildType}); ${arch}, embedding ` +
            `${model.embeddingVectorSize}, key length ${meta[arch]?.attention?.key_length}`);
console.log("prompt tokens:", JSON.stringify(Array.from(model.tokenize(prompt))));
const context = await model.createContext({contextSize: 512});
const completion = new LlamaCompletion({contextSequence: context.getSequence()});
const text = await completion.generateCompletion(prompt, {maxTokens: Number(maxTokens), temperature: 0});
console.log(prompt + text);
await context.dispose();
await model.dispose();
