// What the page keeps in the browser: conversations and sampling settings in localStorage (they survive reloads
// and restarts of the browser), the API key in sessionStorage (this tab only, gone when it closes).
//
// Stored data is read back defensively: anything that does not have the expected shape is dropped, so a
// corrupted or hand-edited entry can never break the page.

const CHATS_KEY = "qwenkit.chats.v1";
const CURRENT_KEY = "qwenkit.current.v1";
const SETTINGS_KEY = "qwenkit.settings.v1";
const API_KEY_KEY = "qwenkit.apiKey";

function read(storage, key) {
  try {
    const raw = storage.getItem(key);
    return raw === null ? null : JSON.parse(raw);
  } catch {
    return null;
  }
}

/** True when stored; false when the browser refused (storage full or disabled). */
function write(storage, key, value) {
  try {
    storage.setItem(key, JSON.stringify(value));
    return true;
  } catch {
    return false;
  }
}

function cleanMessage(m) {
  if (!m || (m.role !== "user" && m.role !== "assistant") || typeof m.content !== "string") return null;
  const out = { role: m.role, content: m.content };
  if (typeof m.error === "string") out.error = m.error;
  if (m.stopped === true) out.stopped = true;
  if (m.stats && typeof m.stats === "object") out.stats = m.stats;
  return out;
}

function cleanChat(c) {
  if (!c || typeof c.id !== "string" || !Array.isArray(c.messages)) return null;
  return {
    id: c.id,
    title: typeof c.title === "string" ? c.title : "",
    system: typeof c.system === "string" ? c.system : "",
    messages: c.messages.map(cleanMessage).filter((m) => m !== null),
    updated: Number.isFinite(c.updated) ? c.updated : 0,
  };
}

export function newChat() {
  const id = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
  return { id, title: "", system: "", messages: [], updated: Date.now() };
}

/** The stored conversations, most recently used first. */
export function loadChats() {
  const chats = read(localStorage, CHATS_KEY);
  if (!Array.isArray(chats)) return [];
  return chats.map(cleanChat).filter((c) => c !== null).sort((a, b) => b.updated - a.updated);
}

export function saveChats(chats, currentId) {
  const ok = write(localStorage, CHATS_KEY, chats);
  write(localStorage, CURRENT_KEY, currentId);
  return ok;
}

export function loadCurrentId() {
  const id = read(localStorage, CURRENT_KEY);
  return typeof id === "string" ? id : null;
}

/** Settings the user changed from the model's defaults: {temperature?, top_p?, max_tokens?}. */
export function loadSettings() {
  const s = read(localStorage, SETTINGS_KEY);
  const out = {};
  if (s && typeof s === "object") {
    for (const name of ["temperature", "top_p", "max_tokens"]) {
      if (Number.isFinite(s[name])) out[name] = s[name];
    }
  }
  return out;
}

export function saveSettings(settings) {
  if (Object.keys(settings).length === 0) localStorage.removeItem(SETTINGS_KEY);
  else write(localStorage, SETTINGS_KEY, settings);
}

export function loadApiKey() {
  try {
    return sessionStorage.getItem(API_KEY_KEY);
  } catch {
    return null;
  }
}

export function saveApiKey(key) {
  try {
    if (key) sessionStorage.setItem(API_KEY_KEY, key);
    else sessionStorage.removeItem(API_KEY_KEY);
  } catch {
    // Storage disabled: the key lives in memory for this page only.
  }
}
