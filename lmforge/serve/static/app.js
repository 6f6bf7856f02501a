// The lmforge chat page: streams /v1/chat/completions (server-sent events read with fetch + ReadableStream)
// and, when the server has a classifier, classifies text with /v1/classify. No build step, no libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const turns = [];   // [{role, content}] of this conversation
let controller = null; // AbortController of the reply being streamed

const keyInput = $("api-key");
keyInput.value = localStorage.getItem("lmforge-api-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("lmforge-api-key", keyInput.value));

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;  // textContent, never innerHTML: model output is not trusted markup
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorText(res) {
  try {
    const body = await res.json();
    return (body.error && body.error.message) || res.statusText;
  } catch (_) {
    return res.status + " " + res.statusText;
  }
}

// Split an SSE byte stream into `data:` payloads; yields each payload string.
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let cut;
    while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

// "12 prompt tokens · 16 generated · first token 35 ms · 48.2 tokens/s": the figures the server measured
// (the `timings` object next to `usage`); older servers send only usage.
function speedText(usage, t) {
  const parts = [`${usage.prompt_tokens} prompt tokens`, `${usage.completion_tokens} generated`];
  if (t && t.time_to_first_token_ms != null) parts.push(`first token ${Math.round(t.time_to_first_token_ms)} ms`);
  if (t && t.tokens_per_second != null) parts.push(`${t.tokens_per_second.toFixed(1)} tokens/s`);
  return parts.join(" · ");
}

async function send(text) {
  turns.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant streaming", "");
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value.trim() });
  messages.push(...turns);
  controller = new AbortController();
  setBusy(true);
  let reply = "";
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        messages, stream: true, stream_options: { include_usage: true },
        temperature: Number($("temperature").value || 0), max_tokens: Number($("max-tokens").value || 256),
      }),
    });
    if (!res.ok) throw new Error(await errorText(res));
    for await (const data of sseData(res.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) $("usage").textContent = speedText(chunk.usage, chunk.timings);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        reply += delta.content;
        out.textContent = reply;
        out.scrollIntoView({ block: "end" });
      }
    }
    turns.push({ role: "assistant", content: reply });
  } catch (e) {
    if (e.name === "AbortError") {
      turns.push({ role: "assistant", content: reply });
    } else {
      turns.pop();  // the user's turn got no answer: let them send it again
      addMessage("error", "Error: " + e.message);
    }
  } finally {
    out.classList.remove("streaming");
    if (!reply) out.remove();
    setBusy(false);
    controller = null;
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

$("chat-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("chat-form").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  turns.length = 0;
  $("messages").textContent = "";
  $("usage").textContent = "";
});

async function classify() {
  const text = $("classify-text").value;
  const box = $("classify-result");
  if (!text.trim()) return;
  $("classify-btn").disabled = true;
  box.textContent = "…";
  try {
    const res = await fetch("/v1/classify", { method: "POST", headers: headers(), body: JSON.stringify({ input: text }) });
    if (!res.ok) throw new Error(await errorText(res));
    const pred = (await res.json()).data[0];
    box.textContent = "";
    const label = document.createElement("div");
    label.className = "label";
    label.textContent = `${pred.label} (${(pred.score * 100).toFixed(1)}%)`;
    box.appendChild(label);
    for (const [name, p] of Object.entries(pred.probabilities).sort((a, b) => b[1] - a[1])) {
      const row = document.createElement("div");
      row.className = "prob";
      const n = document.createElement("span"); n.textContent = name;
      const track = document.createElement("div");
      const bar = document.createElement("div"); bar.className = "bar"; bar.style.width = (p * 100).toFixed(1) + "%";
      track.appendChild(bar);
      const v = document.createElement("span"); v.textContent = (p * 100).toFixed(1) + "%";
      row.append(n, track, v);
      box.appendChild(row);
    }
  } catch (e) {
    box.textContent = "Error: " + e.message;
  } finally {
    $("classify-btn").disabled = false;
  }
}
$("classify-btn").addEventListener("click", classify);

async function init() {
  try {
    const h = await (await fetch("/health")).json();
    $("status").textContent = `model: ${h.model}` + (h.api_key_required ? " · API key required" : "");
    if (h.limits && h.limits.max_tokens) {  // never offer more than the server accepts
      const box = $("max-tokens");
      box.max = h.limits.max_tokens;
      box.value = Math.min(Number(box.value), h.limits.max_tokens);
    }
    if (h.classifier) {
      $("classify-box").classList.remove("hidden");
      $("classifier-name").textContent = h.classifier;
    }
  } catch (e) {
    $("status").textContent = "server unreachable: " + e.message;
  }
}
init();
