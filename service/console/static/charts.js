// Small SVG charts for the console: no library, so nothing to vendor and nothing to download.
"use strict";
const SVG_NS = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs, parent) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

function svgText(parent, x, y, text, attrs) {
  const t = svgEl("text", { x, y, ...(attrs || {}) }, parent);
  t.textContent = text;
  return t;
}

// Line chart of several series over epochs: series = [{name, points: [[x, y], ...], axis: "left"|"right"}].
function lineChart(series, { width = 420, height = 220, title = "", xLabel = "epoch" } = {}) {
  const pad = { l: 44, r: 44, t: 24, b: 30 };
  const svg = svgEl("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title, class: "chart" });
  const all = series.flatMap((s) => s.points);
  if (!all.length) { svgText(svg, 10, 20, "no data yet"); return svg; }
  const xs = all.map((p) => p[0]);
  const xMin = Math.min(...xs), xMax = Math.max(...xs, xMin + 1);
  const range = (axis) => {
    const ys = series.filter((s) => (s.axis || "left") === axis).flatMap((s) => s.points.map((p) => p[1]));
    if (!ys.length) return [0, 1];
    const lo = Math.min(...ys, axis === "right" ? 0 : Infinity), hi = Math.max(...ys, axis === "right" ? 1 : -Infinity);
    return [Math.min(lo, hi), hi === lo ? hi + 1 : hi];
  };
  const ranges = { left: range("left"), right: range("right") };
  const X = (x) => pad.l + ((x - xMin) / (xMax - xMin)) * (width - pad.l - pad.r);
  const Y = (y, axis) => { const [lo, hi] = ranges[axis]; return height - pad.b - ((y - lo) / (hi - lo)) * (height - pad.t - pad.b); };
  svgText(svg, pad.l, 14, title, { class: "chart-title" });
  svgEl("line", { x1: pad.l, y1: height - pad.b, x2: width - pad.r, y2: height - pad.b, class: "axis" }, svg);
  svgText(svg, width / 2, height - 6, xLabel, { "text-anchor": "middle", class: "tick" });
  for (const axis of ["left", "right"]) {
    if (!series.some((s) => (s.axis || "left") === axis)) continue;
    const [lo, hi] = ranges[axis];
    const x = axis === "left" ? pad.l - 4 : width - pad.r + 4;
    svgText(svg, x, Y(hi, axis) + 4, hi.toFixed(2), { "text-anchor": axis === "left" ? "end" : "start", class: "tick" });
    svgText(svg, x, Y(lo, axis), lo.toFixed(2), { "text-anchor": axis === "left" ? "end" : "start", class: "tick" });
  }
  series.forEach((s, i) => {
    const axis = s.axis || "left";
    const pts = s.points.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1], axis).toFixed(1)}`).join(" ");
    svgEl("polyline", { points: pts, class: `series s${i}`, fill: "none" }, svg);
    for (const p of s.points) {
      const c = svgEl("circle", { cx: X(p[0]), cy: Y(p[1], axis), r: 2.5, class: `dot s${i}` }, svg);
      svgEl("title", {}, c).textContent = `${s.name} @ ${p[0]}: ${Number(p[1]).toFixed(4)}`;
    }
    svgText(svg, pad.l + 8 + i * 120, pad.t + 8, s.name, { class: `legend s${i}` });
  });
  return svg;
}

// Confusion matrix heatmap; labels on both axes; every cell carries its count (hover title + data-count).
function confusionHeatmap(labels, matrix, { maxSide = 640 } = {}) {
  const n = labels.length;
  const cell = Math.max(8, Math.min(36, Math.floor(maxSide / Math.max(n, 1))));
  const labelSpace = Math.min(140, 8 + 6.5 * Math.max(...labels.map((l) => String(l).length), 1));
  const font = Math.max(7, Math.min(12, cell - 2));
  const size = labelSpace + n * cell + 4;
  const svg = svgEl("svg", { width: size, height: size, viewBox: `0 0 ${size} ${size}`, role: "img",
    "aria-label": "confusion matrix: rows are true labels, columns predicted", class: "heatmap" });
  const max = Math.max(1, ...matrix.flat());
  labels.forEach((label, i) => {
    svgText(svg, labelSpace - 4, labelSpace + i * cell + cell / 2 + font / 3, label,
      { "text-anchor": "end", "font-size": font, class: "axis-label row-label" });
    const x = labelSpace + i * cell + cell / 2 + font / 3;
    svgText(svg, x, labelSpace - 4, label,
      { "text-anchor": "start", "font-size": font, transform: `rotate(-90 ${x} ${labelSpace - 4})`, class: "axis-label col-label" });
  });
  matrix.forEach((row, i) => row.forEach((count, j) => {
    const share = count / max;
    const hue = i === j ? 210 : 8;
    const rect = svgEl("rect", {
      x: labelSpace + j * cell, y: labelSpace + i * cell, width: cell - 1, height: cell - 1,
      fill: count ? `hsl(${hue}, 70%, ${95 - 55 * share}%)` : "#f7f7f7",
      class: "cell", "data-row": labels[i], "data-col": labels[j], "data-count": count,
    }, svg);
    svgEl("title", {}, rect).textContent = `true ${labels[i]} → predicted ${labels[j]}: ${count}`;
    if (count && cell >= 18) {
      svgText(svg, labelSpace + j * cell + cell / 2, labelSpace + i * cell + cell / 2 + font / 3, count,
        { "text-anchor": "middle", "font-size": Math.max(7, font - 2), class: "cell-text", "pointer-events": "none" });
    }
  }));
  return svg;
}

// Reliability diagram: accuracy vs mean confidence per bin, with the diagonal.
function reliabilityDiagram(bins, { width = 240, height = 240, title = "" } = {}) {
  const pad = 30, side = width - 2 * pad;
  const svg = svgEl("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title, class: "chart" });
  svgText(svg, pad, 14, title, { class: "chart-title" });
  svgEl("line", { x1: pad, y1: pad + side, x2: pad + side, y2: pad, class: "diagonal" }, svg);
  svgEl("rect", { x: pad, y: pad, width: side, height: side, fill: "none", class: "axis" }, svg);
  const n = bins.length || 1;
  bins.forEach((b, i) => {
    if (!b.count) return;
    const h = (b.accuracy || 0) * side;
    const r = svgEl("rect", { x: pad + (i / n) * side, y: pad + side - h, width: side / n - 1, height: h, class: "bar" }, svg);
    svgEl("title", {}, r).textContent = `confidence ${Number(b.confidence ?? b.mean_confidence ?? 0).toFixed(2)}: accuracy ${Number(b.accuracy).toFixed(2)} (${b.count})`;
  });
  svgText(svg, pad + side / 2, height - 4, "confidence", { "text-anchor": "middle", class: "tick" });
  return svg;
}

window.charts = { lineChart, confusionHeatmap, reliabilityDiagram, svgEl, svgText };
