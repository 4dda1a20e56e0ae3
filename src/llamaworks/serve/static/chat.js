// The chat page of `llamaworks serve`: plain JavaScript, no build step, nothing from a CDN.
// It talks to the server's own OpenAI-compatible API: GET /v1/models for the model's name and
// POST /v1/chat/completions with "stream": true, whose server-sent events it parses from the
// fetch body as they arrive. Stop aborts the fetch (AbortController); the server sees the
// connection close and frees the request's slot.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], controller: null };

function apiKey() {
  return $("api-key").value.trim();
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}

function setStatus(text) {
  $("status").textContent = text || "";
}

function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = text;
  $("messages").appendChild(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function loadModel() {
  try {
    const health = await fetch("/health").then((r) => r.json());
    if (health.auth) {
      $("api-key-row").hidden = false;
      const saved = window.localStorage.getItem("llamaworks-api-key");
      if (saved && !apiKey()) $("api-key").value = saved;
    }
  } catch (e) {
    // /health is optional for the page: the models request below says what is wrong.
  }
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    $("api-key-row").hidden = false;
    $("model").textContent = "API key needed";
    setStatus("This server needs its API key: type it in the API key box.");
    return;
  }
  if (!response.ok) {
    $("model").textContent = "unavailable";
    setStatus(await errorText(response));
    return;
  }
  const body = await response.json();
  state.model = body.data[0].id;
  $("model").textContent = state.model;
  setStatus("");
}

// Server-sent events from a fetch body: events are separated by a blank line, and each
// "data: " line of one holds a JSON chunk (or [DONE]).
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function send(text) {
  if (!state.model) await loadModel();
  if (!state.model) return;
  addMessage("user", text);
  state.history.push({ role: "user", content: text });
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const li = addMessage("assistant streaming", "");
  let reply = "";
  let note = "";
  state.controller = new AbortController();
  busy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: state.controller.signal,
      body: JSON.stringify({
        model: state.model,
        messages,
        stream: true,
        temperature: Number($("temperature").value),
        max_tokens: Number($("max-tokens").value) || undefined,
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        reply += choice.delta.content;
        li.textContent = reply;
        li.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason === "length") note = "(cut at the token limit)";
    }
  } catch (e) {
    if (e.name === "AbortError") {
      note = "(stopped)";
    } else {
      const err = addMessage("error", String(e.message || e));
      err.dataset.kind = "error";
    }
  } finally {
    li.classList.remove("streaming");
    li.dataset.done = "true";
    if (note) {
      const span = document.createElement("span");
      span.className = "note";
      span.textContent = note;
      li.appendChild(span);
    }
    // What was shown stays in the conversation, a stopped reply included.
    if (reply) state.history.push({ role: "assistant", content: reply });
    else if (state.history.length && state.history[state.history.length - 1].role === "user") state.history.pop();
    state.controller = null;
    busy(false);
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
});

$("clear").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").replaceChildren();
});

$("temperature").addEventListener("input", () => {
  $("temperature-value").textContent = $("temperature").value;
});

$("api-key").addEventListener("change", () => {
  window.localStorage.setItem("llamaworks-api-key", apiKey());
  state.model = null;
  loadModel();
});

loadModel();
