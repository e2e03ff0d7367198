// A model that calls get_weather, a tool the request does not declare (the AI SDK failed on such calls with
// "Model tried to call unavailable tool"): generated and streamed, the SDK must see a finished text answer.
// argv[3] "none" declares no tools, "other" declares get_date only.
import { generateText, streamText, tool } from "ai";
import { z } from "zod";
import { model, report } from "./models.mjs";

const tools = process.argv[3] === "other"
  ? { get_date: tool({ description: "Get today's date.", inputSchema: z.object({}) }) }
  : undefined;
const options = { prompt: "Weather in Berlin?", maxRetries: 0, tools };
const generated = await generateText({ model: model(), ...options });
const errors = [];
const streamed = streamText({ model: model(), ...options, onError: ({ error }) => errors.push(String(error)) });
await streamed.consumeStream();
report({
  generate: { text: generated.text, finishReason: generated.finishReason, toolCalls: generated.toolCalls },
  stream: { text: await streamed.text, finishReason: await streamed.finishReason,
            toolCalls: await streamed.toolCalls, errors },
});
