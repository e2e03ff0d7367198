// generateText: one request, the answer's text.
import { generateText } from "ai";
import { model, report } from "./models.mjs";

const result = await generateText({ model: model(), prompt: "Say hello.", maxRetries: 0 });
report({ text: result.text, finishReason: result.finishReason, warnings: result.warnings });
