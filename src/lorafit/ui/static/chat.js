// Try-it page: the same prompt to the base model and to the fine-tune, streamed side by side
// (OpenAI chat-completions requests to the page's server), and the export buttons.
import { api, streamChat } from "./api.js";
import { el } from "./setup.js";

const SIDES = ["base", "adapter"];
let history = { base: [], adapter: [] };
let exportPath = null;

export function initChat(exports) {
  document.addEventListener("runs", (event) => fillRuns(event.detail));
  document.getElementById("chat-load").addEventListener("click", load);
  document.getElementById("chat-run").addEventListener("change", updateButtons);
  document.getElementById("chat-send").addEventListener("click", send);
  document.getElementById("chat-clear").addEventListener("click", clear);
  document.getElementById("chat-prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); send(); }
  });
  const bar = document.getElementById("exports");
  for (const kind of exports) {
    const button = el("button", { "data-export": kind, text: { merge: "Merge into a model folder",
      gguf: "Export GGUF (merged)", "gguf-lora": "Export GGUF LoRA" }[kind] || kind });
    button.addEventListener("click", () => startExport(kind));
    bar.append(button);
  }
  updateButtons();
}

function fillRuns(runs) {
  const select = document.getElementById("chat-run");
  const chosen = select.value;
  const options = runs.filter((run) => run.adapter).map((run) =>
    el("option", { value: run.adapter, text: `${run.name} (${run.adapter === run.path ? "final" : "checkpoint"})`,
                   "data-run": run.path }));
  if (options.map((o) => o.value).join() !== [...select.options].map((o) => o.value).join()) {
    select.replaceChildren(...options);
    if (chosen && options.some((o) => o.value === chosen)) select.value = chosen;
  }
  updateButtons();
}

export function chooseAdapter(adapter) {
  const select = document.getElementById("chat-run");
  if (![...select.options].some((o) => o.value === adapter)) select.append(el("option", { value: adapter, text: adapter }));
  select.value = adapter;
  updateButtons();
}

function updateButtons() {
  const select = document.getElementById("chat-run");
  const option = select.selectedOptions[0];
  const final = option && option.value === option.dataset.run;
  document.getElementById("chat-load").disabled = !select.value;
  for (const button of document.querySelectorAll("[data-export]")) button.disabled = !final;
  exportPath = final ? option.dataset.run : null;
}

function status(text) { document.getElementById("chat-status").textContent = text; }
function error(text) { document.getElementById("chat-error").textContent = text || ""; }

async function load() {
  const adapter = document.getElementById("chat-run").value;
  updateButtons();
  status("loading the base model and the adapter…");
  error("");
  try {
    const loaded = await api("/api/chat/load", { method: "POST", json: { adapter } });
    document.getElementById("chat-base-name").textContent = loaded.base;
    document.getElementById("chat-adapter-name").textContent = loaded.adapter.split("/").slice(-2).join("/");
    status("ready");
    clear();
  } catch (failure) {
    status("");
    error(failure.message);
  }
}

function clear() {
  history = { base: [], adapter: [] };
  for (const side of SIDES) document.getElementById(`chat-${side}`).replaceChildren();
}

function settings() {
  const request = {};
  for (const input of document.querySelectorAll("#gen-settings input")) {
    const text = input.value.trim();
    if (text === "") continue;
    request[input.name] = Number.isNaN(Number(text)) ? text : Number(text);
  }
  return request;
}

async function send() {
  const prompt = document.getElementById("chat-prompt").value.trim();
  if (!prompt) return;
  error("");
  document.getElementById("chat-send").disabled = true;
  const request = settings();
  try {
    await Promise.all(SIDES.map(async (side) => {
      const transcript = document.getElementById(`chat-${side}`);
      const messages = [...history[side], { role: "user", content: prompt }];
      transcript.append(el("div", { class: "turn user", text: prompt }));
      const answer = el("div", { class: "turn assistant", "data-side": side });
      transcript.append(answer);
      let text = "";
      await streamChat(`/api/chat/${side}`, { ...request, model: side, messages }, (piece) => {
        text += piece;
        answer.textContent = text;
        transcript.scrollTop = transcript.scrollHeight;
      });
      answer.dataset.done = "true";
      history[side] = [...messages, { role: "assistant", content: text }];
    }));
    document.getElementById("chat-prompt").value = "";
  } catch (failure) {
    error(failure.message);
  } finally {
    document.getElementById("chat-send").disabled = false;
  }
}

async function startExport(kind) {
  if (!exportPath) return;
  const box = document.getElementById("export-status");
  box.hidden = false;
  try {
    let state = await api("/api/export", { method: "POST", json: { path: exportPath, kind } });
    while (state.state === "running") {
      box.textContent = `${state.command}\n(running…)\n${state.log_tail.join("\n")}`;
      await new Promise((resolve) => setTimeout(resolve, 1000));
      state = await api(`/api/export?path=${encodeURIComponent(exportPath)}&kind=${kind}`);
    }
    box.textContent = `${state.command}\n(${state.state})\n${state.log_tail.join("\n")}`;
    box.dataset.state = state.state;
  } catch (failure) {
    box.textContent = failure.message;
  }
}
