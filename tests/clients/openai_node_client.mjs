// Drives a running Tollgate gateway's Responses API with the official `openai` SDK for
// Node: a create, a stream, and a function-tool round trip.
//
// Usage: node openai_node_client.mjs BASE_URL API_KEY MODEL. Prints one JSON object with
// what each call returned; exits non-zero on the first failure.

import OpenAI from "openai";

const [base, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey, maxRetries: 0 });

const created = await client.responses.create({
  model,
  instructions: "Answer briefly.",
  input: "Hello from Node",
});

const events = await client.responses.create({ model, input: "Stream please", stream: true });
let deltas = "";
let completed = null;
let sequence = -1;
let ordered = true;
for await (const event of events) {
  ordered &&= event.sequence_number === sequence + 1;
  sequence = event.sequence_number;
  if (event.type === "response.output_text.delta") deltas += event.delta;
  if (event.type === "response.completed") completed = event.response;
}

const weather = {
  type: "function",
  name: "get_weather",
  description: "The weather of a city",
  parameters: {
    type: "object",
    properties: { city: { type: "string" } },
    required: ["city"],
    additionalProperties: false,
  },
  strict: true,
};
const input = [{ role: "user", content: "Use get_weather for Paris" }];
const first = await client.responses.create({ model, input, tools: [weather] });
const call = first.output.find((item) => item.type === "function_call");
input.push(call, { type: "function_call_output", call_id: call.call_id, output: "sunny in Paris" });
const second = await client.responses.create({ model, input, tools: [weather] });

let notFound = "no error";
try {
  await client.responses.create({ model: "no-such-model", input: "x" });
} catch (e) {
  if (!(e instanceof OpenAI.NotFoundError)) throw e;
  notFound = e.code;
}

console.log(
  JSON.stringify({
    text: created.output_text,
    status: created.status,
    input_tokens: created.usage.input_tokens,
    streamed: deltas,
    final: completed?.output_text ?? completed?.output?.flatMap((i) => i.content ?? []).map((c) => c.text).join(""),
    ordered,
    call: call.name,
    arguments: JSON.parse(call.arguments),
    answer: second.output_text,
    not_found: notFound,
  }),
);
