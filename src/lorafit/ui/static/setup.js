// Set-up page: the form built from /api/form (the lorafit train dataclasses), its errors next to
// their fields, and the equivalent command line / YAML.
import { api, ApiError, showGeneralError } from "./api.js";

const VALUES_STORE = "lorafit.form";
const LOCAL_FOLDER = "__folder__";
let schema = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}
export { el };

function control(field, value) {
  const id = `f-${field.name}`;
  if (field.name === "model_name_or_path") return modelControl(field, value);
  if (field.kind === "bool") {
    const box = el("input", { id, name: field.name, type: "checkbox" });
    box.checked = value === "true";
    return el("div", { class: "control" }, box);
  }
  if (field.kind === "choice") {
    const select = el("select", { id, name: field.name });
    for (const choice of field.choices) select.append(el("option", { value: choice, text: choice }));
    select.value = value;
    return el("div", { class: "control" }, select);
  }
  const input = el("input", { id, name: field.name, placeholder: field.default || "(unset)" });
  input.value = value;
  const parts = [input];
  if (field.suggestions.length) {
    const list = el("datalist", { id: `${id}-list` });
    for (const s of field.suggestions) list.append(el("option", { value: s }));
    input.setAttribute("list", `${id}-list`);
    parts.push(list);
  }
  if (field.kind === "files") {
    const upload = el("input", { type: "file", id: "upload-file", accept: ".json,.jsonl", hidden: "" });
    upload.addEventListener("change", () => uploadFile(upload.files[0]));
    parts.push(el("label", { class: "button", text: "Upload…" }, upload));
  }
  return el("div", { class: "control" }, ...parts);
}

function modelControl(field, value) {
  const embedded = schema.embedded_model;
  const select = el("select", { id: "model-choice" });
  select.append(el("option", { value: embedded, text: `${embedded} (embedded, no download)` }),
                el("option", { value: LOCAL_FOLDER, text: "a local model folder…" }));
  const folder = el("input", { id: "f-model_name_or_path", name: "model_name_or_path", placeholder: "/path/to/model" });
  const isEmbedded = !value || value === embedded;
  select.value = isEmbedded ? embedded : LOCAL_FOLDER;
  folder.value = isEmbedded ? embedded : value;
  folder.hidden = isEmbedded;
  select.addEventListener("change", () => {
    folder.hidden = select.value !== LOCAL_FOLDER;
    folder.value = select.value === LOCAL_FOLDER ? "" : embedded;
    if (!folder.hidden) folder.focus();
    save();
  });
  return el("div", { class: "control" }, select, folder);
}

export function renderForm(formSchema, values) {
  schema = formSchema;
  const container = document.getElementById("fields");
  container.replaceChildren();
  for (const section of schema.sections) {
    const set = el("fieldset", { class: "section" }, el("legend", { text: section }));
    for (const field of schema.fields.filter((f) => f.section === section)) {
      const row = el("div", { class: "field", "data-field": field.name });
      row.append(el("label", { for: `f-${field.name}`, text: field.name, title: field.help }),
                 control(field, values[field.name] ?? field.default),
                 el("div", { class: "help", text: field.help, title: field.help }),
                 el("div", { class: "note", "data-note-for": field.name }),
                 el("div", { class: "field-error", "data-error-for": field.name }));
      set.append(row);
    }
    container.append(set);
  }
  document.getElementById("f-extra_args").value = values.extra_args || "";
  for (const name of ["train_file", "data_format", "template"]) {
    document.getElementById(`f-${name}`)?.addEventListener("change", detect);
  }
  const form = document.getElementById("setup-form");
  if (!form.dataset.listening) {
    form.addEventListener("input", save);
    form.addEventListener("change", save);
    form.dataset.listening = "yes";
  }
}

export function formValues() {
  const values = {};
  for (const field of schema.fields) {
    const input = document.querySelector(`#setup-form [name="${field.name}"]`);
    values[field.name] = field.kind === "bool" ? (input.checked ? "true" : "false") : input.value;
  }
  values.extra_args = document.getElementById("f-extra_args").value;
  return values;
}

export function setFormValues(values) {
  renderForm(schema, values);
  save();
  detect();
}

function save() { localStorage.setItem(VALUES_STORE, JSON.stringify(formValues())); }

export function savedValues() {
  try { return JSON.parse(localStorage.getItem(VALUES_STORE) || "null"); } catch { return null; }
}

export function showErrors(errors = {}) {
  for (const box of document.querySelectorAll("[data-error-for]")) {
    const message = errors[box.dataset.errorFor] || "";
    box.textContent = message;
    box.closest(".field")?.classList.toggle("invalid", Boolean(message));
  }
  const first = Object.keys(errors)[0];
  if (first) document.querySelector(`[data-error-for="${first}"]`)?.scrollIntoView({ block: "center" });
}

// Runs `call`; a 422 puts its messages next to their fields (and returns null), others go on top.
// Only the latest call shows its outcome: an earlier, slower answer never hides a newer one's errors.
let latestCall = 0;
export async function withFormErrors(call) {
  const mine = ++latestCall;
  showGeneralError("");
  try {
    const result = await call();
    if (mine === latestCall) showErrors({});
    return result;
  } catch (error) {
    if (mine !== latestCall) return null;
    if (error instanceof ApiError && error.status === 422) {
      showErrors(error.body.errors);
      return null;
    }
    showErrors({});
    showGeneralError(error.message);
    return null;
  }
}

async function uploadFile(file) {
  if (!file) return;
  const result = await withFormErrors(() => api(`/api/upload?filename=${encodeURIComponent(file.name)}`,
                                                 { method: "POST", body: file }));
  if (result) {
    document.getElementById("f-train_file").value = result.path;
    save();
    detect();
  }
}

export async function detect() {
  const notes = document.querySelectorAll("[data-note-for]");
  notes.forEach((note) => { note.textContent = ""; });
  if (!document.getElementById("f-train_file").value.trim()) return;
  let result;
  try {  // a hint only: errors are shown when the user previews, saves or starts
    result = await api("/api/detect", { method: "POST", json: { values: formValues() } });
  } catch {
    return;
  }
  const formats = [...new Set(Object.values(result.formats))];
  document.querySelector('[data-note-for="data_format"]').textContent = `detected: ${formats.join(", ") || "–"}`;
  document.querySelector('[data-note-for="template"]').textContent = `in force: ${result.template}`;
}

export async function showEquivalent() {
  const result = await withFormErrors(() => api("/api/equivalent", { method: "POST", json: { values: formValues() } }));
  const box = document.getElementById("equivalent");
  box.hidden = !result;
  if (result) box.textContent = result.command;
  return result;
}

export async function saveYaml() {
  const result = await showEquivalent();
  if (!result) return;
  document.getElementById("equivalent").textContent = result.yaml;
  const link = el("a", { href: URL.createObjectURL(new Blob([result.yaml], { type: "text/yaml" })),
                         download: "lorafit-train.yaml" });
  document.body.append(link);
  link.click();
  link.remove();
}

export async function loadYaml(file) {
  if (!file) return;
  const text = await file.text();
  const result = await withFormErrors(() => api("/api/config", { method: "POST", body: text, contentType: "text/yaml" }));
  if (result) setFormValues(result.values);
}
