// The chat page: conversations, the composer, settings, the API-key prompt and the streaming of replies.
//
// User text is shown with textContent; replies go through markdown.js, which builds DOM nodes and never parses
// HTML (the Content-Security-Policy's Trusted Types make any HTML sink throw). All model calls go to this
// server's own /v1/chat/completions (api.js); what is kept in the browser is store.js's job.

import { ApiError, describeError, getConfig, streamChat } from "./api.js";
import { copyButton, renderMarkdown } from "./markdown.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);

const state = {
  config: null, // from /web/config
  apiKey: store.loadApiKey(),
  chats: store.loadChats(),
  currentId: store.loadCurrentId(),
  settings: store.loadSettings(), // only what the user changed from the model's defaults
  controller: null, // the AbortController of the reply being streamed
  editing: -1, // index of the user message being edited
};

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, className, onClick) {
  const b = el("button", className, label);
  b.type = "button";
  b.addEventListener("click", onClick);
  return b;
}

function current() {
  let chat = state.chats.find((c) => c.id === state.currentId);
  if (!chat) {
    chat = state.chats[0] ?? store.newChat();
    if (!state.chats.includes(chat)) state.chats.unshift(chat);
    state.currentId = chat.id;
  }
  return chat;
}

function save() {
  if (!store.saveChats(state.chats, state.currentId)) {
    showBanner("The browser refused to store the conversations (storage full?); delete old chats to keep new ones.");
  }
}

function showBanner(text) {
  const banner = $("banner");
  banner.textContent = text;
  banner.hidden = !text;
}

// ---- the API key ---------------------------------------------------------------------------------------------

/** Ask for the key; resolves with it, or null when the user closes the dialog. */
function askApiKey(message) {
  const dialog = $("key-dialog");
  $("key-message").textContent = message;
  $("key-input").value = "";
  return new Promise((resolve) => {
    const done = (key) => {
      $("key-form").removeEventListener("submit", onSubmit);
      dialog.removeEventListener("cancel", onCancel);
      if (dialog.open) dialog.close();
      resolve(key);
    };
    const onSubmit = (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (key) done(key);
    };
    const onCancel = () => done(null);
    $("key-form").addEventListener("submit", onSubmit);
    dialog.addEventListener("cancel", onCancel);
    dialog.showModal();
    $("key-input").focus();
  });
}

/** Run `call(apiKey)`; on a 401 ask for the key and try again. Null when the user gave up. */
async function withApiKey(call) {
  for (;;) {
    try {
      return await call(state.apiKey);
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 401) throw err;
      const message = state.apiKey
        ? "The server did not accept this key. Enter the key that `qwenkit serve --api-key` was given."
        : "This server needs an API key (it was started with --api-key).";
      const key = await askApiKey(message);
      if (key === null) {
        showBanner("An API key is needed to talk to this server; reload the page to enter it.");
        return null;
      }
      state.apiKey = key;
      store.saveApiKey(key);
    }
  }
}

// ---- settings ----------------------------------------------------------------------------------------------

const FIELDS = { temperature: "temperature", top_p: "top-p", max_tokens: "max-tokens" };

function showSettings() {
  const defaults = state.config?.defaults ?? {};
  for (const [name, id] of Object.entries(FIELDS)) {
    const value = state.settings[name] ?? defaults[name];
    $(id).value = value === undefined ? "" : String(value);
    $(id).placeholder = defaults[name] === undefined ? "" : String(defaults[name]);
  }
  if (state.config) {
    const d = state.config.defaults;
    $("settings-note").textContent = `Model defaults (generation_config.json): temperature ${d.temperature} (0 = greedy), top_p ${d.top_p}, max tokens ${d.max_tokens}; context ${state.config.max_model_len} tokens.`;
  }
  $("system").value = current().system;
}

function readSettings() {
  const defaults = state.config?.defaults ?? {};
  const changed = {};
  for (const [name, id] of Object.entries(FIELDS)) {
    const text = $(id).value.trim();
    const value = name === "max_tokens" ? parseInt(text, 10) : parseFloat(text);
    if (text !== "" && Number.isFinite(value) && value !== defaults[name]) changed[name] = value;
  }
  state.settings = changed;
  store.saveSettings(changed);
}

function requestSettings() {
  return { ...(state.config?.defaults ?? {}), ...state.settings };
}

// ---- rendering ---------------------------------------------------------------------------------------------

function statsText(stats, stopped) {
  const parts = [];
  if (stats) {
    parts.push(`${stats.approx ? "≈" : ""}${stats.tokens} tokens`);
    if (stats.rate !== null) parts.push(`${stats.rate.toFixed(1)} tok/s`);
    if (stats.ttft !== null) parts.push(`first token ${stats.ttft.toFixed(2)} s`);
    if (stats.prompt !== null) parts.push(`prompt ${stats.prompt} tokens`);
    if (stats.finish === "length") parts.push("cut at max tokens");
  }
  if (stopped) parts.push("stopped");
  return parts.join(" · ");
}

function fillBody(body, message) {
  body.replaceChildren();
  if (message.role === "user") {
    body.textContent = message.content; // never markdown, never HTML: exactly what was typed
  } else {
    body.append(renderMarkdown(message.content));
  }
}

function messageNode(message, index, chat) {
  const node = el("article", `msg ${message.role}`);
  node.dataset.index = String(index);
  node.append(el("div", "role", message.role === "user" ? "You" : "Assistant"));
  const body = node.appendChild(el("div", "body"));
  const busy = state.controller !== null;
  if (message.role === "user" && state.editing === index) {
    const area = body.appendChild(el("textarea", "edit-box"));
    area.value = message.content;
    area.setAttribute("aria-label", "Edit message");
    const bar = node.appendChild(el("div", "tools"));
    bar.append(
      button("Save & send", "save-edit", () => resend(chat, index, area.value)),
      button("Cancel", "cancel-edit", () => {
        state.editing = -1;
        render();
      }),
    );
    queueMicrotask(() => area.focus());
    return node;
  }
  fillBody(body, message);
  if (message.error) node.appendChild(el("div", "error", message.error)).setAttribute("role", "alert");
  node.append(el("div", "meta", statsText(message.stats, message.stopped)));
  const bar = node.appendChild(el("div", "tools"));
  if (message.content) bar.append(copyButton(message.content, "Copy text"));
  if (message.role === "user" && !busy) {
    bar.append(
      button("Edit", "edit", () => {
        state.editing = index;
        render();
      }),
    );
  }
  return node;
}

function renderChatList() {
  const list = $("chat-list");
  list.replaceChildren();
  const busy = state.controller !== null;
  for (const chat of state.chats) {
    const item = list.appendChild(el("li", chat.id === state.currentId ? "active" : ""));
    const open = item.appendChild(
      button(chat.title || "New chat", "open-chat", () => {
        state.currentId = chat.id;
        state.editing = -1;
        save();
        render();
        document.body.classList.remove("show-sidebar");
      }),
    );
    open.disabled = busy;
    const del = item.appendChild(
      button("×", "delete-chat", () => {
        state.chats = state.chats.filter((c) => c !== chat);
        save();
        render();
      }),
    );
    del.setAttribute("aria-label", `Delete ${chat.title || "chat"}`);
    del.disabled = busy;
  }
}

function render() {
  const chat = current();
  const box = $("messages");
  box.replaceChildren(...chat.messages.map((m, i) => messageNode(m, i, chat)));
  if (chat.messages.length === 0) box.append(el("p", "empty", "Send a message to start."));
  const busy = state.controller !== null;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("regenerate").disabled = busy || !chat.messages.some((m) => m.role === "user");
  $("clear").disabled = busy || chat.messages.length === 0;
  $("new-chat").disabled = busy;
  $("system").value = chat.system;
  renderChatList();
  box.scrollTop = box.scrollHeight;
}

function updateReply(reply) {
  const node = $("messages").lastElementChild;
  if (!node) return;
  fillBody(node.querySelector(".body"), reply);
  node.querySelector(".meta").textContent = statsText(reply.stats, reply.stopped);
  const box = $("messages");
  if (box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
}

// ---- generation --------------------------------------------------------------------------------------------

function apiMessages(chat) {
  const out = [];
  if (chat.system.trim()) out.push({ role: "system", content: chat.system });
  for (const m of chat.messages) {
    if (m.content) out.push({ role: m.role, content: m.content }); // a failed, empty reply is left out
  }
  return out;
}

/** Stream a new assistant reply at the end of `chat`. */
async function generate(chat) {
  if (!state.config) {
    showBanner("The server is not ready yet; wait a moment and try again.");
    return;
  }
  const body = { model: state.config.model, messages: apiMessages(chat), ...requestSettings() };
  const reply = { role: "assistant", content: "" };
  chat.messages.push(reply);
  chat.updated = Date.now();
  const controller = new AbortController();
  state.controller = controller;
  showBanner("");
  render();
  const started = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  let finish = null;
  let pending = false;
  const repaint = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      updateReply(reply);
    });
  };
  try {
    const ok = await withApiKey(async (key) => {
      for await (const event of streamChat(body, key, controller.signal)) {
        if (event.content) {
          first ??= performance.now();
          chunks += 1;
          reply.content += event.content;
          repaint();
        } else if (event.finish) {
          finish = event.finish;
        } else if (event.usage) {
          usage = event.usage;
        }
      }
      return true;
    });
    if (ok === null) reply.error = "No API key: the server refused the request (401).";
  } catch (err) {
    if (err.name === "AbortError") reply.stopped = true;
    else reply.error = describeError(err);
  }
  const end = performance.now();
  const tokens = usage ? usage.completion_tokens : chunks;
  if (tokens > 0 || usage) {
    // Generation speed after the first token (the prompt's prefill is in "first token").
    const decodeSeconds = first === null ? 0 : (end - first) / 1000;
    reply.stats = {
      tokens,
      approx: usage === null,
      prompt: usage ? usage.prompt_tokens : null,
      ttft: first === null ? null : (first - started) / 1000,
      rate: tokens > 1 && decodeSeconds > 0 ? (tokens - 1) / decodeSeconds : null,
      finish,
    };
  }
  state.controller = null;
  chat.updated = Date.now();
  save();
  render();
}

function send(text) {
  const chat = current();
  if (state.controller || !text.trim()) return;
  chat.messages.push({ role: "user", content: text });
  if (!chat.title) chat.title = text.trim().split("\n")[0].slice(0, 48);
  $("input").value = "";
  save();
  generate(chat);
}

function resend(chat, index, text) {
  if (!text.trim()) return;
  chat.messages = chat.messages.slice(0, index);
  chat.messages.push({ role: "user", content: text });
  if (index === 0) chat.title = text.trim().split("\n")[0].slice(0, 48);
  state.editing = -1;
  save();
  generate(chat);
}

function regenerate() {
  const chat = current();
  if (state.controller) return;
  while (chat.messages.length && chat.messages[chat.messages.length - 1].role === "assistant") chat.messages.pop();
  if (chat.messages.length) generate(chat);
}

// ---- start -------------------------------------------------------------------------------------------------

async function loadConfig() {
  try {
    const config = await withApiKey(getConfig);
    if (config === null) return;
    state.config = config;
    $("model-name").textContent = config.model;
    showBanner("");
    showSettings();
  } catch (err) {
    if (err instanceof ApiError && err.status === 503) {
      showBanner("The model is still loading…");
      setTimeout(loadConfig, 2000);
    } else {
      showBanner(describeError(err));
    }
  }
}

function wire() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send($("input").value);
  });
  $("input").addEventListener("keydown", (event) => {
    // Enter sends; Shift+Enter is a new line; Enter that ends an IME composition (Chinese input) does not send.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send($("input").value);
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("regenerate").addEventListener("click", regenerate);
  $("clear").addEventListener("click", () => {
    const chat = current();
    chat.messages = [];
    chat.title = "";
    state.editing = -1;
    save();
    render();
  });
  $("new-chat").addEventListener("click", () => {
    const chat = store.newChat();
    state.chats.unshift(chat);
    state.currentId = chat.id;
    state.editing = -1;
    save();
    render();
    document.body.classList.remove("show-sidebar");
    $("input").focus();
  });
  $("system").addEventListener("input", () => {
    current().system = $("system").value;
    save();
  });
  for (const id of Object.values(FIELDS)) $(id).addEventListener("input", readSettings);
  $("reset-settings").addEventListener("click", () => {
    state.settings = {};
    store.saveSettings({});
    showSettings();
  });
  $("toggle-settings").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
  });
  $("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("show-sidebar"));
}

wire();
render();
showSettings();
loadConfig();
