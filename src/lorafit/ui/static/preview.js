// Preview page: `lorafit data inspect` as the server computes it (lorafit.ui.preview).
import { el } from "./setup.js";

export function renderPreview(result, badRecords = null) {
  document.getElementById("preview-empty").hidden = true;
  document.getElementById("preview-body").hidden = false;
  const bad = badRecords || result?.bad_records || [];
  const rows = document.querySelector("#bad-records tbody");
  rows.replaceChildren(...bad.map((r) => el("tr", {}, el("td", { text: r.source }), el("td", { text: r.reason }))));
  document.getElementById("bad-records").hidden = !bad.length;
  document.getElementById("no-bad-records").hidden = Boolean(bad.length);
  const examples = document.getElementById("examples");
  if (!result) {  // the data was refused: its bad records are all there is to show
    document.getElementById("preview-summary").textContent =
      `${bad.length} bad record(s): nothing is trained from this file until they are fixed ` +
      "(or on_bad_record is skip).";
    document.getElementById("preview-detected").textContent = "";
    examples.replaceChildren();
    return;
  }
  const formats = [...new Set(Object.values(result.formats))].join(", ");
  document.getElementById("preview-detected").textContent = `format: ${formats} · template: ${result.template}`;
  document.getElementById("preview-summary").textContent = result.summary_text;
  examples.replaceChildren(...result.examples.map((example) => {
    const text = el("div", { class: "text" });
    for (const run of example.runs) {
      text.append(run.trained ? el("span", { class: "trained", text: run.text }) : document.createTextNode(run.text));
    }
    return el("div", { class: "example" },
              el("div", { class: "source", text: `${example.source} · ${example.tokens} tokens, ${example.trained} trained` }),
              text);
  }));
}
