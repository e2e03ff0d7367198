// The language model a scenario script runs against: argv[2] names the client kind, OSSRT_URL the server
// (http://127.0.0.1:PORT), OSSRT_MODEL its model id.
import { createOpenAI } from "@ai-sdk/openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";

const KINDS = {
  // @ai-sdk/openai's Responses API model (the provider's default) and its Chat Completions model
  responses: (baseURL, id) => createOpenAI({ baseURL, apiKey: "x" }).responses(id),
  chat: (baseURL, id) => createOpenAI({ baseURL, apiKey: "x" }).chat(id),
  compatible: (baseURL, id) => createOpenAICompatible({ name: "ossrt", baseURL, apiKey: "x" }).chatModel(id),
};

const kind = process.argv[2];

// The SDK logs warnings to stdout, where the report goes; scenarios report them instead
globalThis.AI_SDK_LOG_WARNINGS = false;

export function model() {
  const make = KINDS[kind];
  if (!make) throw new Error(`client kind must be one of ${Object.keys(KINDS).join(", ")}, got ${kind}`);
  return make(`${process.env.OSSRT_URL}/v1`, process.env.OSSRT_MODEL);
}

// What a scenario found, for the Python test to assert on.
export function report(result) {
  process.stdout.write(JSON.stringify(result) + "\n");
}
