// A small SVG line chart: a few series of [x, y] points, axes with round ticks. No library.
const NS = "http://www.w3.org/2000/svg";
const WIDTH = 480, HEIGHT = 220, LEFT = 56, RIGHT = 12, TOP = 10, BOTTOM = 28;

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function ticks(low, high, count = 4) {
  if (high === low) return [low];
  const raw = (high - low) / count;
  const step = 10 ** Math.floor(Math.log10(raw)) * [1, 2, 5, 10].find((m) => m * 10 ** Math.floor(Math.log10(raw)) >= raw);
  const first = Math.ceil(low / step) * step;
  const values = [];
  for (let v = first; v <= high + step * 1e-9; v += step) values.push(Number(v.toPrecision(12)));
  return values;
}

function label(value) {
  if (value === 0) return "0";
  const size = Math.abs(value);
  return size < 1e-2 || size >= 1e5 ? value.toExponential(1) : String(Number(value.toPrecision(3)));
}

// series: [{name, color, points: [[x, y], ...], dots}]; the svg gets data-points (for tests).
export function drawChart(svg, series, { xLabel = "step" } = {}) {
  const all = series.flatMap((s) => s.points);
  svg.replaceChildren();
  svg.dataset.points = String(all.length);
  if (!all.length) {
    svg.append(svgEl("text", { x: WIDTH / 2, y: HEIGHT / 2, "text-anchor": "middle" }, "waiting for the first log…"));
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const pad = Math.abs(y0) * 0.1 || 1; y0 -= pad; y1 += pad; }
  const margin = (y1 - y0) * 0.05;
  y0 -= margin; y1 += margin;
  const sx = (x) => LEFT + ((x - x0) / (x1 - x0)) * (WIDTH - LEFT - RIGHT);
  const sy = (y) => HEIGHT - BOTTOM - ((y - y0) / (y1 - y0)) * (HEIGHT - TOP - BOTTOM);
  for (const y of ticks(y0, y1)) {
    svg.append(svgEl("line", { class: "grid", x1: LEFT, x2: WIDTH - RIGHT, y1: sy(y), y2: sy(y) }),
               svgEl("text", { x: LEFT - 6, y: sy(y) + 4, "text-anchor": "end" }, label(y)));
  }
  for (const x of ticks(x0, x1, 5).filter((x) => Number.isInteger(x) || x1 - x0 < 5)) {
    svg.append(svgEl("text", { x: sx(x), y: HEIGHT - BOTTOM + 16, "text-anchor": "middle" }, label(x)));
  }
  svg.append(svgEl("line", { class: "axis", x1: LEFT, x2: LEFT, y1: TOP, y2: HEIGHT - BOTTOM }),
             svgEl("line", { class: "axis", x1: LEFT, x2: WIDTH - RIGHT, y1: HEIGHT - BOTTOM, y2: HEIGHT - BOTTOM }),
             svgEl("text", { x: WIDTH - RIGHT, y: HEIGHT - 2, "text-anchor": "end" }, xLabel));
  let legendX = LEFT + 8;
  for (const s of series.filter((s) => s.points.length)) {
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    svg.append(svgEl("path", { class: "series", d, stroke: s.color, "data-series": s.name }));
    if (s.dots || s.points.length === 1) {
      for (const p of s.points) svg.append(svgEl("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: s.color }));
    }
    svg.append(svgEl("text", { x: legendX, y: TOP + 12, fill: s.color, style: `fill:${s.color}` }, s.name));
    legendX += 8 + 7 * s.name.length;
  }
}
