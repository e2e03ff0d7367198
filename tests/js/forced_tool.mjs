// A forced tool call against a model that calls get_time, a tool the request does not declare: the server steers
// the call to a declared tool. argv[3] is the choice: "required", with get_weather (strict, an enum city) the only
// tool, or a tool's name, with get_date declared too. No execute, so the run ends on the call.
import { generateText, tool } from "ai";
import { z } from "zod";
import { model, report } from "./models.mjs";

const getWeather = tool({ description: "Get the current weather for a city.", strict: true,
                          inputSchema: z.object({ city: z.enum(["Berlin", "Paris"]) }) });
const getDate = tool({ description: "Get today's date.", inputSchema: z.object({}) });
const choice = process.argv[3];
const [tools, toolChoice] = choice === "required"
  ? [{ get_weather: getWeather }, "required"]
  : [{ get_weather: getWeather, get_date: getDate }, { type: "tool", toolName: choice }];
const result = await generateText({ model: model(), prompt: "What time is it?", maxRetries: 0, temperature: 0,
                                    tools, toolChoice });
report({
  finishReason: result.finishReason,
  toolCalls: result.toolCalls.map((c) => ({ toolName: c.toolName, input: c.input, invalid: c.invalid ?? false })),
  warnings: result.warnings,
});
