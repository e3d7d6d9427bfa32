// Calls to the page's server. The key (lorafit ui --api_key) comes from the address's #key=...
// part, which browsers never send to a server, and is kept for this tab only.

const KEY_STORE = "lorafit.key";

export function rememberKeyFromAddress() {
  const match = location.hash.match(/key=([^&]+)/);
  if (match) {
    sessionStorage.setItem(KEY_STORE, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

export function setKey(key) { sessionStorage.setItem(KEY_STORE, key); }

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

export class ApiError extends Error {
  constructor(status, body) {
    super((body && (body.error?.message || body.error)) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

export async function api(path, { method = "GET", json, body, contentType } = {}) {
  const init = { method, headers: headers() };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
    init.headers["Content-Type"] = contentType || "application/octet-stream";
  }
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch { data = null; }
  if (!response.ok) {
    if (response.status === 401) document.getElementById("key-box").hidden = false;
    throw new ApiError(response.status, data);
  }
  return data;
}

// An OpenAI chat-completions stream (server-sent events): onText(piece) for each content delta.
export async function streamChat(path, request, onText) {
  const response = await fetch(path, {
    method: "POST", headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify({ ...request, stream: true }),
  });
  if (!response.ok) {
    let data = null;
    try { data = await response.json(); } catch { data = null; }
    throw new ApiError(response.status, data);
  }
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
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk);
      const piece = chunk.choices?.[0]?.delta?.content;
      if (piece) onText(piece);
    }
  }
}

export function showGeneralError(message) {
  const banner = document.getElementById("general-error");
  banner.textContent = message || "";
  banner.hidden = !message;
}
