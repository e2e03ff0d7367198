// Reasoning shown, generated and streamed. @ai-sdk/openai's Responses model shows reasoning only from summaries,
// and sends reasoning options only for model ids it knows reason (gpt-oss ids are not among them: it drops
// reasoningSummary with a warning), so forceReasoning too. The compatible model reads reasoning_content.
import { generateText, streamText } from "ai";
import { model, report } from "./models.mjs";

const options = { prompt: "Think about it.", maxRetries: 0,
                  providerOptions: { openai: { reasoningSummary: "auto", forceReasoning: true } } };
const generated = await generateText({ model: model(), ...options });
const streamed = streamText({ model: model(), ...options });
const deltas = [];
for await (const part of streamed.fullStream) {
  if (part.type === "reasoning-delta") deltas.push(part.text);
  if (part.type === "error") throw part.error;
}
report({
  generate: { reasoningText: generated.reasoningText ?? null, text: generated.text, warnings: generated.warnings },
  stream: { deltas, reasoningText: (await streamed.reasoningText) ?? null },
});
