// tuneserve console: the production loop's views (Review, Monitor) over the same HTTP API.
// Uses console.js's helpers ($, el, fill, fmt, pct, api, showError, fillModelSelects) and charts.js's lineChart.
"use strict";

async function capturedImage(url) {
  // fetched with the key (reads may be protected), shown from a blob URL
  const headers = {};
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(url, { headers });
  if (!response.ok) throw new Error(`${response.status}: the captured image is gone (aged out?)`);
  return URL.createObjectURL(await response.blob());
}

async function postJson(path, body) {
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { method: "POST", body: JSON.stringify(body || {}), headers });
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const message = (data && data.error) || response.statusText;
    throw new Error(`${response.status}: ${response.status === 401 ? `API key needed or wrong (enter it at the top): ${message}` : message}`);
  }
  return data;
}

async function labelsOf(model) {
  const detail = await api(`/models/${encodeURIComponent(model)}`);
  const newest = detail.versions.find((v) => v.version === detail.latest) || detail.versions[0];
  return (newest && newest.manifest && newest.manifest.labels) || [];
}

// ---- Review: the most informative captured image; pick its label or skip ----------------------
async function loadReview() {
  showError("#review-error", null);
  const model = $("#review-model").value.split(":")[0];
  const out = $("#review-item");
  if (!model) { fill(out, el("p", {}, "no model")); return; }
  try {
    const [queue, labels] = await Promise.all([api(`/models/${encodeURIComponent(model)}/review?limit=1`), labelsOf(model)]);
    $("#review-waiting").textContent = `${queue.waiting} waiting`;
    const item = queue.items[0];
    if (!item) { fill(out, el("p", {}, "Nothing to review: capture is off, or every captured image is labelled.")); return; }
    const image = el("img", { alt: `captured image ${item.capture_id}`, class: "review-image", src: await capturedImage(item.image_url) });
    const answer = (label) => async () => {
      try {
        await postJson("/feedback", { request_id: item.capture_id, label });
        loadReview();
      } catch (err) { showError("#review-error", err); }
    };
    const skip = async () => {
      try { await api(`/models/${encodeURIComponent(model)}/review/${item.capture_id}/skip`, { method: "POST" }); loadReview(); }
      catch (err) { showError("#review-error", err); }
    };
    fill(out, image,
      el("p", {}, `answered ${item.label || "(abstained)"} at ${fmt(item.confidence)}; margin ${fmt(item.margin)}, `,
        `in-domain ${fmt(item.in_domain)}; captured because ${item.reason}; version ${item.version}`),
      el("div", { class: "label-buttons", role: "group", "aria-label": "true label" },
        ...labels.map((label) => el("button", { type: "button", "data-label": label, onclick: answer(label) }, label)),
        el("button", { type: "button", class: "skip", onclick: skip }, "Skip")));
  } catch (err) { fill(out); showError("#review-error", err); }
}

// ---- Monitor: per version accuracy (held-out vs live), drift chart, rollout controls ------------
function versionRow(version, v) {
  const live = v.live, drift = v.drift || {};
  const embedding = drift.embedding || {};
  return el("tr", {},
    el("td", {}, version), el("td", {}, fmt(v.eval_accuracy)),
    el("td", {}, live.count ? `${fmt(live.accuracy)} [${fmt(live.interval[0])}, ${fmt(live.interval[1])}]` : "–"),
    el("td", {}, String(live.count)), el("td", {}, String(v.answered)),
    el("td", { class: embedding.drifted ? "drifted" : "" }, embedding.p_value === undefined ? "–" : fmt(embedding.p_value)),
    el("td", {}, pct(drift.in_domain_rate)), el("td", {}, pct(drift.abstention_rate)),
    el("td", {}, drift.labels ? fmt(drift.labels.psi) : "–"));
}

function driftChart(version, history) {
  const series = (name, key, axis) => ({ name, axis, points: history.map((h, i) => [i + 1, h[key]]).filter((p) => p[1] !== null) });
  return lineChart([series("MMD p-value", "p_value", "left"), series("in-domain", "in_domain_rate", "right"),
    series("abstained", "abstention_rate", "right")], { title: `drift of ${version} by window`, xLabel: "window" });
}

async function rolloutAction(model, path, body) {
  try {
    await postJson(`/models/${encodeURIComponent(model)}/${path}`, body);
    loadMonitor();
  } catch (err) { showError("#monitor-error", err); }
}

async function loadMonitor() {
  showError("#monitor-error", null);
  const model = $("#monitor-model").value.split(":")[0];
  const out = $("#monitor-detail");
  if (!model) return;
  try {
    const m = await api(`/models/${encodeURIComponent(model)}/monitor`);
    const r = m.serving.rollout;
    const head = el("tr", {}, ...["version", "eval accuracy", "live accuracy [95 %]", "labelled", "answered", "drift p", "in-domain", "abstained", "label PSI"].map((h) => el("th", {}, h)));
    const rows = Object.entries(m.versions).map(([version, v]) => versionRow(version, v));
    const charts = Object.entries(m.versions).filter(([, v]) => v.history.length).map(([version, v]) => driftChart(version, v.history));
    const versionInput = el("input", { id: "rollout-version", placeholder: "version", size: 18 });
    const mode = el("select", { id: "rollout-mode" }, el("option", {}, "canary"), el("option", {}, "shadow"));
    const percent = el("input", { id: "rollout-percent", type: "number", min: 0, max: 100, value: 10, size: 4 });
    fill(out,
      el("p", {}, `latest ${m.serving.latest}`, r ? `; stable ${r.stable}` : "", r && r.candidate ? `, candidate ${r.candidate} (${r.mode}${r.mode === "canary" ? ` ${r.percent} %` : ""})` : ""),
      el("table", { class: "monitor" }, head, ...rows),
      m.shadow ? el("p", {}, `shadow: ${m.shadow.requests} requests, agreement ${pct(m.shadow.agreement)}, `,
        `latency stable ${fmt(m.shadow.stable_ms, 1)} ms vs candidate ${fmt(m.shadow.candidate_ms, 1)} ms`) : null,
      el("div", { class: "charts" }, ...charts),
      el("p", {}, `captured: ${m.captures.images} images (${(m.captures.bytes / 1048576).toFixed(1)} MiB), capture ${m.captures.enabled ? "on" : "off"}`),
      el("form", { class: "rollout", onsubmit: (e) => { e.preventDefault(); rolloutAction(model, "rollout", { version: versionInput.value.trim(), mode: mode.value, percent: Number(percent.value) }); } },
        el("label", { for: "rollout-version" }, "Candidate"), versionInput, mode, percent, el("button", { type: "submit" }, "Roll out"),
        el("button", { type: "button", id: "promote", onclick: () => rolloutAction(model, "promote") }, "Promote"),
        el("button", { type: "button", id: "rollback", onclick: () => rolloutAction(model, "rollback") }, "Roll back")),
      el("h3", {}, "Rollout events"),
      el("ul", {}, ...m.events.map((e) => el("li", {}, `${new Date(e.at * 1000).toLocaleString()}: ${e.action} ${e.version || ""} by ${e.by || "?"} (${e.detail || ""})`))));
  } catch (err) { fill(out); showError("#monitor-error", err); }
}

window.loopViews = {
  review: async () => { await fillModelSelects(); loadReview(); },
  monitor: async () => { await fillModelSelects(); loadMonitor(); },
};
document.addEventListener("DOMContentLoaded", () => {
  $("#review-model").addEventListener("change", loadReview);
  $("#monitor-model").addEventListener("change", loadMonitor);
  $("#monitor-refresh").addEventListener("click", loadMonitor);
});
