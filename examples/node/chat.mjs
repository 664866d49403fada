// The openai npm package against a Shard Oracle:
//   cd examples/node && npm install && OPENAI_API_KEY=sk-oracle-... node chat.mjs
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.OPENAI_BASE_URL ?? "http://127.0.0.1:8000/v1", apiKey: process.env.OPENAI_API_KEY });
const model = process.env.SHARD_MODEL ?? "SmolLM2-135M-Instruct.Q4_1";
const reply = await client.chat.completions.create({
  model, temperature: 0, max_tokens: 24, messages: [{ role: "user", content: "What is the capital of France?" }],
});
console.log(reply.choices[0].message.content);
const stream = await client.chat.completions.create({
  model, temperature: 0, max_tokens: 24, stream: true, messages: [{ role: "user", content: "What is the capital of France?" }],
});
let text = "";
for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
console.log(text);
