// Train page: the runs of the runs folder, and the chosen run's live state and curves, polled from
// the server (which reads metrics.jsonl and the run's log), so a reload shows the same thing.
import { api, showGeneralError } from "./api.js";
import { drawChart } from "./chart.js";
import { el } from "./setup.js";

const RUN_STORE = "lorafit.run";
const POLL_MS = 1000;
let current = null;  // {path, metrics: Map, count, described}
let onTry = () => {};

export function initTrain(tryAdapter) {
  onTry = tryAdapter;
  document.getElementById("run-stop").addEventListener("click", () => act("stop"));
  document.getElementById("run-resume").addEventListener("click", () => act("resume"));
  document.getElementById("run-try").addEventListener("click", () => current?.described?.adapter && onTry(current.described.adapter));
  const remembered = localStorage.getItem(RUN_STORE);
  if (remembered) select(remembered);
  poll();
}

export function select(path) {
  if (current?.path !== path) current = { path, metrics: new Map(), count: 0, described: null };
  localStorage.setItem(RUN_STORE, path);
  document.getElementById("run-detail").hidden = false;
  refreshRun();
}

export function showStarted(described) {
  select(described.path);
  renderRun(described);
}

async function act(action) {
  if (!current) return;
  try {
    renderRun(await api(`/api/run/${action}`, { method: "POST", json: { path: current.path } }));
    showGeneralError("");
  } catch (error) {
    showGeneralError(error.message);
  }
}

async function poll() {
  try {
    await Promise.all([refreshList(), refreshRun()]);
  } catch (error) {
    console.warn(error);
  }
  setTimeout(poll, POLL_MS);
}

export async function refreshList() {
  const { runs } = await api("/api/runs");
  const body = document.querySelector("#runs tbody");
  body.replaceChildren(...runs.map((run) => {
    const row = el("tr", { "data-path": run.path, class: run.path === current?.path ? "current" : "" },
                   el("td", { text: run.name, title: run.path }),
                   el("td", {}, el("span", { class: `badge ${run.state}`, text: run.state })),
                   el("td", { text: run.step ? `${run.step}/${run.max_steps}` : "–" }));
    row.addEventListener("click", () => select(run.path));
    return row;
  }));
  document.getElementById("no-runs").hidden = runs.length > 0;
  document.dispatchEvent(new CustomEvent("runs", { detail: runs }));
  if (!current && runs.length) select((runs.find((r) => r.running) || runs[0]).path);
}

async function refreshRun() {
  if (!current) return;
  const run = current;
  const described = await api(`/api/run?path=${encodeURIComponent(run.path)}&since=${run.count}`);
  if (run !== current) return;
  if (described.metrics_count < run.count) {  // a resumed run rewrote metrics.jsonl: read it again
    run.metrics.clear();
    run.count = 0;
    return refreshRun();
  }
  for (const record of described.metrics) {
    const kind = "eval_loss" in record ? "eval" : "loss" in record ? "train" : "other";
    run.metrics.set(`${kind}:${record.step}`, record);
  }
  run.count = described.metrics_count;
  renderRun(described);
}

function last(records, key) {
  for (let i = records.length - 1; i >= 0; i -= 1) if (records[i][key] != null) return records[i][key];
  return null;
}

function renderRun(described) {
  if (!current || described.path !== current.path) return;
  current.described = described;
  const records = [...current.metrics.values()].sort((a, b) => a.step - b.step);
  const text = (id, value) => { document.getElementById(id).textContent = value ?? "–"; };
  text("run-name", described.name);
  const badge = document.getElementById("run-state");
  badge.textContent = described.state;
  badge.className = `badge ${described.state}`;
  text("run-step", described.step);
  text("run-max", described.max_steps);
  const loss = last(records, "loss"), lr = last(records, "lr"), tps = last(records, "tokens_per_second");
  text("run-loss", loss == null ? null : loss.toFixed(4));
  text("run-lr", lr == null ? null : lr.toExponential(2));
  text("run-tps", tps == null ? null : Math.round(tps).toLocaleString());
  text("run-eta", described.running ? described.eta : null);
  const progress = document.getElementById("run-progress");
  progress.max = described.max_steps || 1;
  progress.value = described.step || 0;
  document.getElementById("run-stop").disabled = !described.running || described.state === "stopping";
  document.getElementById("run-resume").disabled = described.running || !described.resumable;
  document.getElementById("run-try").disabled = !described.adapter;
  text("run-message", described.message || (described.state === "preparing" ? "loading the model and data…" : ""));
  text("run-command", described.command);
  text("run-log", described.log_tail.join("\n"));
  const points = (key) => records.filter((r) => r[key] != null).map((r) => [r.step, r[key]]);
  drawChart(document.getElementById("chart-loss"), [
    { name: "train loss", color: "#2563eb", points: points("loss") },
    { name: "eval loss", color: "#ea580c", points: points("eval_loss"), dots: true },
  ]);
  drawChart(document.getElementById("chart-lr"), [{ name: "lr", color: "#7c3aed", points: points("lr") }]);
  for (const row of document.querySelectorAll("#runs tbody tr")) {
    row.classList.toggle("current", row.dataset.path === current.path);
  }
}
