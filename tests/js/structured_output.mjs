// Structured output: generateText with Output.object and a zod schema whose city is an enum. The server must
// steer a model that writes prose into the schema. @ai-sdk/openai-compatible sends the schema only when told the
// provider supports structured outputs (otherwise a bare json_object), so that model is made with the flag here.
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateText, Output } from "ai";
import { z } from "zod";
import { model, report } from "./models.mjs";

const schema = z.object({ city: z.enum(["Berlin", "Paris"]) });
const chosen = process.argv[2] === "compatible"
  ? createOpenAICompatible({ name: "ossrt", baseURL: `${process.env.OSSRT_URL}/v1`, apiKey: "x",
                             supportsStructuredOutputs: true }).chatModel(process.env.OSSRT_MODEL)
  : model();
const result = await generateText({ model: chosen, prompt: "Which city is the capital of France?", maxRetries: 0,
                                    temperature: 0, output: Output.object({ schema, name: "city" }) });
report({ output: result.output, finishReason: result.finishReason, warnings: result.warnings });
