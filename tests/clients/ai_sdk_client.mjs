// Drives a running Tollgate gateway with the Vercel AI SDK's default OpenAI provider,
// whose `openai(model)` speaks the Responses API.
//
// Usage: node ai_sdk_client.mjs BASE_URL API_KEY MODEL. Prints one JSON object with what
// each call returned; exits non-zero on the first failure.

import { createOpenAI } from "@ai-sdk/openai";
import { generateText, streamText } from "ai";

const [base, apiKey, model] = process.argv.slice(2);
const openai = createOpenAI({ baseURL: `${base}/v1`, apiKey });

const whole = await generateText({ model: openai(model), prompt: "Hello from the AI SDK" });
const streamed = streamText({ model: openai(model), prompt: "Stream please" });
let text = "";
for await (const piece of streamed.textStream) {
  text += piece;
}
const usage = await streamed.usage;
console.log(
  JSON.stringify({
    text: whole.text,
    finish: whole.finishReason,
    input_tokens: whole.usage.inputTokens,
    streamed: text,
    streamed_output_tokens: usage.outputTokens,
  }),
);
