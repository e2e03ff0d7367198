// Conversations, kept in this browser's localStorage only: the server keeps nothing between turns (each request
// carries the whole conversation), so a new chat shares nothing with an old one.
const KEY = "ossrt-chat.conversations";
const CURRENT = "ossrt-chat.current";

// Not crypto.randomUUID(): that needs a secure context, and a phone reaching `ossrt serve --host 0.0.0.0` over
// the LAN loads the page over plain HTTP.
function randomId() {
  return Array.from(crypto.getRandomValues(new Uint32Array(4)), (n) => n.toString(16).padStart(8, "0")).join("");
}

export function newConversation(settings) {
  return {
    id: randomId(),
    title: "New chat",
    created: new Date().toISOString(),
    settings: { ...settings },  // reasoning effort, temperature, system prompt
    messages: [],  // {role: "user"|"assistant", content, reasoning?, stats?, error?}
  };
}

export function loadAll() {
  try {
    const list = JSON.parse(localStorage.getItem(KEY) || "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];  // damaged by hand: start afresh rather than break the page
  }
}

export function saveAll(conversations, current) {
  localStorage.setItem(KEY, JSON.stringify(conversations));
  localStorage.setItem(CURRENT, current.id);
}

export function currentId() {
  return localStorage.getItem(CURRENT);
}

export function exportJson(conversation) {
  const blob = new Blob([JSON.stringify(conversation, null, 2)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${conversation.title.replace(/[^\w.-]+/g, "_").slice(0, 60) || "chat"}.json`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}
