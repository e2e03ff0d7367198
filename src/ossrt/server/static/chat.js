// The chat page: conversations on the left, the current one on the right, answers streamed from the server.
import { modelId, streamChat } from "./api.js";
import { currentId, exportJson, loadAll, newConversation, saveAll } from "./conversations.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const DEFAULT_SETTINGS = { effort: "medium", temperature: 1, system: "" };

let conversations = loadAll();
let conversation = conversations.find((c) => c.id === currentId()) || newConversation(DEFAULT_SETTINGS);
let model = null;
let running = null;  // the AbortController of the answer being generated

function save() {
  if (conversation.messages.length && !conversations.includes(conversation)) conversations.unshift(conversation);
  saveAll(conversations, conversation);
}

// --- the conversation list ---
function showList() {
  const list = $("chats");
  list.replaceChildren();
  for (const c of conversations) {
    const item = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.textContent = c.title;
    open.title = c.title;
    if (c === conversation) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => select(c));
    item.append(open);
    list.append(item);
  }
}

function select(c) {
  if (running) running.abort();
  conversation = c;
  const s = c.settings;
  $("effort").value = s.effort;
  $("temperature").value = s.temperature;
  $("system").value = s.system;
  $("title").textContent = c.title;
  $("messages").replaceChildren(...c.messages.map((m) => messageView(m).element));
  scrollToEnd();
  document.body.classList.remove("chats-open");
  $("toggle-chats").setAttribute("aria-expanded", "false");
  showList();
  save();
}

// --- messages ---
function stats(m) {
  if (m.error) return `error: ${m.error}`;
  if (!m.stats) return "";
  const rate = m.stats.tokensPerSecond == null ? "" : `${m.stats.tokensPerSecond.toFixed(1)} tokens/s · `;
  return `${rate}${m.stats.tokens} tokens · ${m.stats.stopReason}`;
}

// The element of message `m`, and update(), which shows its current text (at most once a frame while streaming).
function messageView(m) {
  const element = document.createElement("article");
  element.className = `message ${m.role}`;
  const body = document.createElement("div");
  body.className = "content";
  if (m.role === "user") {
    body.textContent = m.content;
    element.append(body);
    return { element, update() {} };
  }
  const reasoning = document.createElement("details");
  reasoning.className = "reasoning";
  const summary = document.createElement("summary");
  summary.textContent = "Reasoning";
  reasoning.append(summary);
  const reasoningText = document.createElement("div");
  reasoningText.className = "reasoning-text";
  reasoning.append(reasoningText);
  const footer = document.createElement("footer");
  footer.className = "stats";
  element.append(reasoning, body, footer);
  let pending = false;
  const show = () => {
    pending = false;
    const box = $("messages");
    const following = box.scrollHeight - box.scrollTop - box.clientHeight < 40;  // not scrolled up to read
    reasoning.hidden = !m.reasoning;
    reasoningText.textContent = m.reasoning || "";
    renderMarkdown(body, m.content);
    footer.textContent = stats(m);
    footer.classList.toggle("error", Boolean(m.error));
    if (following) scrollToEnd();
  };
  show();
  return {
    element,
    reasoning,
    update(now = false) {
      if (now) show();
      else if (!pending) {
        pending = true;
        requestAnimationFrame(show);
      }
    },
  };
}

function scrollToEnd() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

// The conversation as the API takes it: the system prompt, then what was said. Answers that produced no text
// (one stopped while reasoning) are left out, and a question the server refused (too long, say) goes with its error.
function requestMessages(c) {
  const messages = c.settings.system.trim() ? [{ role: "system", content: c.settings.system }] : [];
  for (const m of c.messages) {
    if (m.error) messages.pop();
    else if (m.role === "user" || m.content) messages.push({ role: m.role, content: m.content });
  }
  return messages;
}

async function send(text) {
  const c = conversation;
  if (!c.messages.length) {
    c.title = text.replace(/\s+/g, " ").slice(0, 48);
    $("title").textContent = c.title;
  }
  const question = { role: "user", content: text };
  c.messages.push(question);
  const body = { model, messages: requestMessages(c), reasoning_effort: c.settings.effort,
                 temperature: c.settings.temperature };
  const answer = { role: "assistant", content: "", reasoning: "" };
  c.messages.push(answer);
  save();
  showList();
  $("messages").append(messageView(question).element);
  const view = messageView(answer);
  view.reasoning.open = true;
  $("messages").append(view.element);
  scrollToEnd();

  running = new AbortController();
  setRunning(true);
  let first = null, last = null, pieces = 0;
  try {
    const result = await streamChat(body, running.signal, ({ reasoning, content }) => {
      last = performance.now();
      first ??= last;
      pieces += 1;
      answer.reasoning += reasoning;
      answer.content += content;
      view.update();
    });
    answer.stats = { tokens: result.usage?.completion_tokens ?? pieces,
                     stopReason: result.finishReason ?? "connection closed" };
  } catch (e) {
    if (e.name === "AbortError") answer.stats = { tokens: pieces, stopReason: "stopped" };
    else answer.error = e.message;
  }
  if (answer.stats) {
    // The first token waited for the prompt: the rate counts the intervals after it.
    const seconds = (last - first) / 1000;
    answer.stats.tokensPerSecond = pieces > 1 && seconds > 0 ? (answer.stats.tokens - 1) / seconds : null;
  }
  running = null;
  setRunning(false);
  view.reasoning.open = false;
  view.update(true);
  if (conversations.includes(c)) saveAll(conversations, conversation);
}

function setRunning(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
}

// --- controls ---
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!model) connect();
  if (!text || running || !model) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => running?.abort());
const readTemperature = (v) => (v === "" ? DEFAULT_SETTINGS.temperature : Number(v));  // a cleared field
for (const [key, read] of [["effort", String], ["temperature", readTemperature], ["system", String]]) {
  $(key).addEventListener("change", () => {
    conversation.settings[key] = read($(key).value);
    save();
  });
}
$("new-chat").addEventListener("click", () => select(newConversation(conversation.settings)));
$("toggle-chats").addEventListener("click", () => {
  const open = document.body.classList.toggle("chats-open");
  $("toggle-chats").setAttribute("aria-expanded", String(open));
});
$("rename").addEventListener("click", () => {
  const title = prompt("Rename this chat", conversation.title);
  if (title?.trim()) {
    conversation.title = title.trim();
    $("title").textContent = conversation.title;
    save();
    showList();
  }
});
$("export").addEventListener("click", () => exportJson(conversation));
$("delete").addEventListener("click", () => {
  if (!confirm(`Delete "${conversation.title}"?`)) return;
  conversations = conversations.filter((c) => c !== conversation);
  select(conversations[0] || newConversation(conversation.settings));
});

// Asks the server which model it serves (and so for the key, when it needs one); sending tries again after a
// failure, such as a key prompt dismissed.
let connecting = null;

function connect() {
  connecting ??= modelId().then(
    (id) => {
      model = id;
      $("model").textContent = id;
      $("model").classList.remove("error");
      document.body.dataset.ready = "true";  // the tests wait for this
    },
    (e) => {
      $("model").textContent = `not connected: ${e.message}`;
      $("model").classList.add("error");
    },
  ).finally(() => { connecting = null; });
}

select(conversation);
connect();
