// A declared tool that the model calls: its execute runs and its result goes back in the next step's request.
// The scripted model calls it after every prompt, so the run stops at the step limit.
import { generateText, stepCountIs, tool } from "ai";
import { z } from "zod";
import { model, report } from "./models.mjs";

const STEPS = 2;
const calls = [];
const getWeather = tool({
  description: "Get the current weather for a city.",
  inputSchema: z.object({ city: z.string() }),
  execute: async ({ city }) => {
    calls.push(city);
    return `Sunny in ${city}`;
  },
});
const result = await generateText({ model: model(), prompt: "Weather in Berlin?", maxRetries: 0,
                                    tools: { get_weather: getWeather }, stopWhen: stepCountIs(STEPS) });
report({
  calls,
  steps: result.steps.map((s) => ({
    finishReason: s.finishReason,
    toolCalls: s.toolCalls.map((c) => ({ toolName: c.toolName, input: c.input })),
    toolResults: s.toolResults.map((r) => r.output),
  })),
});
