// lorafit ui: tabs and wiring. Each page's logic is in its own module.
import { api, rememberKeyFromAddress, setKey, showGeneralError } from "./api.js";
import { chooseAdapter, initChat } from "./chat.js";
import { renderPreview } from "./preview.js";
import { detect, formValues, loadYaml, renderForm, saveYaml, savedValues, showEquivalent, withFormErrors } from "./setup.js";
import { initTrain, showStarted } from "./train.js";

function showTab(name) {
  for (const section of document.querySelectorAll("section.tab")) section.hidden = section.id !== name;
  for (const button of document.querySelectorAll("#tabs button")) {
    button.classList.toggle("active", button.dataset.tab === name);
  }
  history.replaceState(null, "", `#${name}`);
}

async function preview() {
  const button = document.getElementById("do-preview");
  button.disabled = true;
  try {
    let badRecords = null;
    const result = await withFormErrors(async () => {
      try {
        return await api("/api/preview", { method: "POST", json: { values: formValues() } });
      } catch (error) {
        badRecords = error.body?.bad_records || null;
        throw error;
      }
    });
    if (result || badRecords) {
      renderPreview(result, badRecords);
      if (result) showTab("preview");
    }
  } finally {
    button.disabled = false;
  }
}

async function start() {
  const button = document.getElementById("do-start");
  button.disabled = true;
  button.textContent = "Checking…";
  try {
    const described = await withFormErrors(() => api("/api/runs", { method: "POST", json: { values: formValues() } }));
    if (described) {
      showStarted(described);
      showTab("train");
    }
  } finally {
    button.disabled = false;
    button.textContent = "Start training";
  }
}

async function main() {
  rememberKeyFromAddress();
  document.getElementById("key-save").addEventListener("click", () => {
    setKey(document.getElementById("key-input").value);
    location.reload();
  });
  for (const button of document.querySelectorAll("#tabs button")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }
  let schema;
  try {
    schema = await api("/api/form");
  } catch (error) {
    showGeneralError(error.message);
    return;
  }
  renderForm(schema, { ...schema.values, ...(savedValues() || {}) });
  document.getElementById("runs-dir").textContent = `in ${schema.runs_dir}`;
  document.getElementById("do-preview").addEventListener("click", preview);
  document.getElementById("do-command").addEventListener("click", showEquivalent);
  document.getElementById("do-yaml").addEventListener("click", saveYaml);
  document.getElementById("load-yaml").addEventListener("change", (event) => {
    loadYaml(event.target.files[0]);
    event.target.value = "";
  });
  document.getElementById("do-start").addEventListener("click", start);
  initChat(schema.exports);
  initTrain((adapter) => { chooseAdapter(adapter); showTab("try"); });
  const tab = location.hash.slice(1);
  showTab(["setup", "preview", "train", "try"].includes(tab) ? tab : "setup");
  detect();
  document.body.dataset.ready = "true";
}

main();
