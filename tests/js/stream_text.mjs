// streamText: the answer as the text deltas arrive.
import { streamText } from "ai";
import { model, report } from "./models.mjs";

const errors = [];
const result = streamText({ model: model(), prompt: "Say hello.", maxRetries: 0,
                            onError: ({ error }) => errors.push(String(error)) });
const deltas = [];
for await (const delta of result.textStream) deltas.push(delta);
report({ deltas, text: await result.text, finishReason: await result.finishReason, errors });
