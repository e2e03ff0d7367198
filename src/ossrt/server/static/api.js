// The server's OpenAI API: the key (asked for on a 401, kept in memory, in localStorage only when the user ticks
// "remember"), and chat completions streamed as server-sent events.
const KEY = "ossrt-chat.api-key";
let apiKey = localStorage.getItem(KEY);

const dialog = document.getElementById("key-dialog");
const form = document.getElementById("key-form");

function askKey(reason) {
  document.getElementById("key-reason").textContent = reason;
  const input = document.getElementById("key-input");
  input.value = "";
  dialog.showModal();
  return new Promise((resolve, reject) => {
    const submitted = (event) => {
      event.preventDefault();
      done();
      apiKey = input.value;
      if (document.getElementById("key-remember").checked) localStorage.setItem(KEY, apiKey);
      else localStorage.removeItem(KEY);
      dialog.close();
      resolve();
    };
    const cancelled = () => {
      done();
      reject(new Error("this server needs an API key"));
    };
    const done = () => {
      form.removeEventListener("submit", submitted);
      dialog.removeEventListener("cancel", cancelled);
    };
    form.addEventListener("submit", submitted);
    dialog.addEventListener("cancel", cancelled);
  });
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// fetch() with the key; on a 401, ask for a key and try again.
async function apiFetch(path, init = {}) {
  for (;;) {
    const headers = { ...init.headers };
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401) return response;
    await askKey(apiKey ? `The key was refused: ${await errorMessage(response)}` : "This server needs an API key.");
  }
}

export async function modelId() {
  const response = await apiFetch("/v1/models");
  if (!response.ok) throw new Error(await errorMessage(response));
  return (await response.json()).data[0].id;
}

// Streams one answer: `onDelta({reasoning, content})` for each piece. Returns {finishReason, usage} (usage as the
// server counted it). Aborting `signal` closes the connection, and the server stops generating.
export async function streamChat(body, signal, onDelta) {
  const response = await apiFetch("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const result = { finishReason: null, usage: null };
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      buffer = buffer.slice(end + 2);
      if (!data) continue;
      if (data === "[DONE]") return result;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) result.usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      const { reasoning_content: reasoning, content } = choice.delta;
      if (reasoning || content) onDelta({ reasoning: reasoning || "", content: content || "" });
      if (choice.finish_reason) result.finishReason = choice.finish_reason;
    }
  }
  return result;
}
