// Model output as Markdown, safely: raw HTML in it is shown as text (marked's html renderer escapes it), and
// DOMPurify cleans the rendered HTML as a second line of defence. The page's Content-Security-Policy is the third.
import { Marked } from "./vendor/marked.esm.js";

const ENTITIES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ENTITIES[c]);
}

const marked = new Marked({
  gfm: true,
  breaks: true,
  renderer: {
    html: ({ text }) => escapeHtml(text),  // block and inline HTML alike
  },
});

export function renderMarkdown(element, text) {
  element.innerHTML = window.DOMPurify.sanitize(marked.parse(text));
  for (const link of element.querySelectorAll("a[href]")) {
    link.target = "_blank";  // a link followed in place would leave the chat
    link.rel = "noopener noreferrer";
  }
}
