// tuneserve console: four views over the same HTTP API that clients use. Plain JS, no build step.
"use strict";
const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
};
// replaceChildren would print null as text; optional parts of a view are null when absent
const fill = (node, ...kids) => node.replaceChildren(...kids.flat().filter((k) => k !== null && k !== undefined && k !== false));
const fmt = (x, digits = 3) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(digits));
const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)} %`);

// ---- API access: the key lives in sessionStorage (this tab only) and goes out as a Bearer header.
const KEY_ITEM = "tuneserve.apiKey";
async function api(path, { method = "GET", body } = {}) {
  const headers = {};
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) headers.Authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(path, { method, body, headers });
  } catch (err) {
    throw new Error(`cannot reach the server: ${err.message}`);
  }
  const type = response.headers.get("content-type") || "";
  const data = type.includes("json") ? await response.json().catch(() => null) : await response.text();
  if (!response.ok) {
    let message = (data && (data.error || data.detail)) || (typeof data === "string" && data) || response.statusText;
    if (typeof message !== "string") message = JSON.stringify(message);
    if (response.status === 401) message = `API key needed or wrong (enter it at the top): ${message}`;
    throw new Error(`${response.status}: ${message}`);
  }
  return data;
}

function showError(id, err) {
  const box = $(id);
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = err.message || String(err);
  box.hidden = false;
}

// ---- navigation -----------------------------------------------------------------------------
const VIEWS = ["classify", "models", "finetune", "evaluate", "review", "monitor"];  // review, monitor: loop.js
let jobsTimer = null;
function route() {
  const [view, arg] = (location.hash.slice(1) || "classify").split("/");
  const current = VIEWS.includes(view) ? view : "classify";
  for (const v of VIEWS) {
    $(`#view-${v}`).hidden = v !== current;
    const link = $(`nav a[data-view="${v}"]`);
    if (v === current) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  clearInterval(jobsTimer);
  if (current === "models") loadModels(arg ? decodeURIComponent(arg) : null);
  if (current === "finetune") { loadFinetuneOptions(); refreshJobs(); jobsTimer = setInterval(refreshJobs, 1500); }
  if (current === "classify" || current === "evaluate") fillModelSelects();
  if (window.loopViews && window.loopViews[current]) window.loopViews[current](arg);
}

// ---- model choices shared by the views ------------------------------------------------------
let modelCache = null;
async function fetchModels(force = false) {
  if (!modelCache || force) modelCache = await api("/models");
  return modelCache;
}
async function fillModelSelects() {
  let data;
  try { data = await fetchModels(true); } catch (err) { showError("#global-error", err); return; }
  showError("#global-error", null);
  for (const select of document.querySelectorAll(".model-select")) {
    const keep = select.value;
    fill(select);
    if (select.dataset.optional) select.append(el("option", { value: "" }, "(none)"));
    for (const [name, info] of Object.entries(data.models || {})) {
      select.append(el("option", { value: name }, `${name} (latest${info.latest ? " " + info.latest : ""})`));
      for (const v of info.versions || []) select.append(el("option", { value: `${name}:${v.version}` }, `  ${name}:${v.version}`));
    }
    if (keep) select.value = keep;
    else if (!select.dataset.optional && data.default_model && data.models[data.default_model]) select.value = data.default_model;
  }
}

// ---- Classify -------------------------------------------------------------------------------
function wireDrop(zoneId, input, multiple) {
  const zone = $(zoneId);
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault(); zone.classList.remove("over");
    const files = multiple ? e.dataTransfer.files : [e.dataTransfer.files[0]];
    const dt = new DataTransfer(); for (const f of files) if (f) dt.items.add(f);
    input.files = dt.files;
  });
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
}

function predictionBars(predictions) {
  const list = el("ol", { class: "bars" });
  for (const p of predictions || []) {
    const width = Math.max(0.5, 100 * (p.probability || 0));
    list.append(el("li", { class: "bar-row" },
      el("span", { class: "bar-label" }, p.label),
      el("span", { class: "bar-track" }, el("span", { class: "bar-fill", style: `width:${width}%` })),
      el("span", { class: "bar-value" }, fmt(p.probability, 4))));
  }
  return list;
}

// The evidence overlay (docs/explain.md) over the card's image, and a button that toggles it off and on.
function evidenceToggle(card, evidence) {
  const img = card.querySelector("img"), original = img.src, overlay = `data:image/png;base64,${evidence.overlay_png}`;
  img.src = overlay;
  const button = el("button", { type: "button", class: "evidence-toggle", "aria-pressed": "true" }, `Evidence for ${evidence.label}: on`);
  button.addEventListener("click", () => {
    const on = button.getAttribute("aria-pressed") !== "true";
    img.src = on ? overlay : original;
    button.setAttribute("aria-pressed", String(on));
    button.textContent = `Evidence for ${evidence.label}: ${on ? "on" : "off"}`;
  });
  return button;
}

async function classifyRequest(form, explain) {
  if (!explain) return [await api("/classify", { method: "POST", body: form }), null];
  const asked = new FormData();
  for (const [key, value] of form.entries()) asked.append(key, value);
  asked.append("explain_overlay", "true");
  try {
    return [await api("/classify", { method: "POST", body: asked }), null];
  } catch (err) {  // 409: this version has no evidence maps; answer without them and say why
    if (!err.message.startsWith("409")) throw err;
    return [await api("/classify", { method: "POST", body: form }), err.message.slice(5)];
  }
}

async function classifyOne(file, model, topK, minConfidence, explain) {
  const form = new FormData();
  form.append("image", file);
  if (model) form.append("model", model);
  form.append("top_k", topK);
  if (minConfidence) form.append("min_confidence", minConfidence);
  const card = el("figure", { class: "card", "data-file": file.name },
    el("img", { src: URL.createObjectURL(file), alt: file.name }), el("figcaption", {}, `${file.name}: classifying…`));
  $("#classify-results").append(card);
  const started = performance.now();
  try {
    const [r, noEvidence] = await classifyRequest(form, explain);
    const ms = performance.now() - started;
    const top = r.label !== undefined ? r.label : (r.predictions && r.predictions[0] && r.predictions[0].label);
    const abstained = r.abstained ? el("p", { class: "abstained" }, "abstained: below the confidence threshold") : null;
    fill(card.querySelector("figcaption"), 
      el("strong", { class: "top-label" }, top === null ? "(no answer)" : top), abstained,
      predictionBars(r.predictions),
      el("p", { class: "meta" }, `${r.model}:${r.version}${r.variant ? " · " + r.variant : ""}`
        + `${r.in_domain !== undefined && r.in_domain !== null ? " · in-domain " + fmt(r.in_domain, 2) : ""} · ${ms.toFixed(0)} ms`),
      r.evidence && r.evidence.overlay_png ? evidenceToggle(card, r.evidence) : null,
      noEvidence ? el("p", { class: "meta no-evidence" }, noEvidence) : null);
  } catch (err) {
    card.classList.add("failed");
    fill(card.querySelector("figcaption"), el("span", { class: "error-text", role: "alert" }, `${file.name}: ${err.message}`));
  }
}

async function onClassify(e) {
  e.preventDefault();
  showError("#classify-error", null);
  const files = Array.from($("#classify-files").files || []);
  if (!files.length) { showError("#classify-error", new Error("pick or drop at least one image")); return; }
  fill($("#classify-results"));
  const model = $("#classify-model").value, topK = $("#classify-topk").value || "3";
  const explain = $("#classify-explain").checked;
  await Promise.all(files.map((f) => classifyOne(f, model, topK, $("#classify-confidence").value.trim(), explain)));
}

// ---- Models ---------------------------------------------------------------------------------
async function loadModels(selected) {
  showError("#models-error", null);
  let data;
  try { data = await fetchModels(true); } catch (err) { showError("#models-error", err); return; }
  const list = el("ul", { class: "model-list" });
  for (const [name, info] of Object.entries(data.models || {})) {
    const versions = el("ul", {});
    for (const v of info.versions || []) {
      const ref = `${name}:${v.version}`;
      const acc = v.eval && v.eval.accuracy !== undefined ? ` · acc ${fmt(v.eval.accuracy)}` : "";
      versions.append(el("li", {}, el("a", { href: `#models/${encodeURIComponent(ref)}`, "data-ref": ref },
        `${v.version}${v.version === info.latest ? " (latest)" : ""}${acc}`)));
    }
    list.append(el("li", {}, el("a", { href: `#models/${encodeURIComponent(name)}`, "data-ref": name, class: "model-name" }, name), versions));
  }
  if (!list.children.length) list.append(el("li", {}, "no models stored yet"));
  fill($("#models-list"), list);
  if (selected) await showModel(selected);
}

async function showModel(ref) {
  const started = performance.now();
  const box = $("#model-detail");
  fill(box, el("p", {}, `loading ${ref}…`));
  let data;
  try { data = await api(`/models/${encodeURIComponent(ref)}`); } catch (err) { fill(box); showError("#models-error", err); return; }
  const version = data.versions[data.versions.length - 1];
  const manifest = version.manifest || {};
  const training = manifest.training || {};
  const lineage = [...(manifest.lineage || []), manifest.source, `${data.name}:${version.version}`].filter(Boolean);
  const uniqueLineage = lineage.filter((x, i) => lineage.indexOf(x) === i);
  fill(box, 
    el("h3", {}, `${data.name}:${version.version}`),
    el("p", { class: "lineage", "aria-label": "lineage" }, uniqueLineage.join(" → ")),
    el("p", { class: "meta" }, `backbone ${manifest.backbone} · ${(manifest.labels || []).length} labels · input ${manifest.preprocessing ? manifest.preprocessing.size : "?"} px · created ${version.created || manifest.created_at || ""}`),
    trainingSection(training),
    extrasSection(manifest, version.eval_report),
    version.eval_report ? reportView(version.eval_report) : el("p", {}, "no eval.json for this version"));
  box.dataset.renderMs = (performance.now() - started).toFixed(1);
  box.dataset.ref = ref;
}

function trainingSection(training) {
  const { history, ...config } = training;
  const wrap = el("div", { class: "training" });
  if (history && history.length) {
    const pts = (key) => history.filter((h) => h[key] !== null && h[key] !== undefined).map((h) => [h.epoch, h[key]]);
    wrap.append(charts.lineChart([
      { name: "train loss", points: pts("train_loss") },
      { name: "val loss", points: pts("val_loss") },
      { name: "val accuracy", points: pts("val_accuracy"), axis: "right" },
    ], { title: "training curves" }));
  }
  const details = el("details", {}, el("summary", {}, "training config"));
  const dl = el("dl", { class: "config" });
  for (const [k, v] of Object.entries(config)) dl.append(el("dt", {}, k), el("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v)));
  details.append(dl);
  wrap.append(details);
  return wrap;
}

// Calibration, thresholds, variants, recipe: shown when the version carries them.
function extrasSection(manifest, report) {
  const wrap = el("div", { class: "extras" });
  const cal = manifest.calibration;
  if (cal && cal.temperature !== undefined) wrap.append(el("p", {}, `calibration: temperature ${fmt(cal.temperature)}`));
  const rel = (report && report.calibration) || {};
  for (const when of ["before", "after"]) {
    const part = rel[when];
    if (part && part.reliability) {
      wrap.append(charts.reliabilityDiagram(part.reliability, { title: `${when}: ECE ${fmt(part.ece)}, NLL ${fmt(part.nll)}` }));
    }
  }
  if (report && report.risk_coverage && report.risk_coverage.length) {
    const points = report.risk_coverage.map((r) => [r.coverage, r.accuracy]).sort((a, b) => a[0] - b[0]);
    wrap.append(charts.lineChart([{ name: "accuracy of answered", points }], { title: "risk–coverage", xLabel: "coverage", width: 300 }));
  }
  if (manifest.thresholds && Object.keys(manifest.thresholds).length) {
    const per = manifest.thresholds.per_label || manifest.thresholds;
    const t = el("table", { class: "table thresholds" }, el("thead", {}, el("tr", {}, el("th", {}, "label"), el("th", {}, "auto threshold"))));
    const body = el("tbody");
    for (const [label, value] of Object.entries(per)) if (typeof value === "number") body.append(el("tr", {}, el("td", {}, label), el("td", {}, fmt(value))));
    t.append(body);
    if (body.children.length) wrap.append(el("h4", {}, "per-label thresholds"), t);
  }
  if (manifest.variants && Object.keys(manifest.variants).length) {
    wrap.append(el("h4", {}, "precision variants"), el("pre", {}, JSON.stringify(manifest.variants, null, 1)));
  }
  if (manifest.recipe) wrap.append(el("h4", {}, "recipe"), el("pre", {}, JSON.stringify(manifest.recipe, null, 1)));
  return wrap;
}

function reportView(report, title) {
  const wrap = el("div", { class: "report" });
  if (title) wrap.append(el("h4", {}, title));
  wrap.append(el("p", { class: "headline" },
    `accuracy ${fmt(report.accuracy)} · top-${report.top_k || "k"} ${fmt(report.top_k_accuracy)} · macro F1 ${fmt(report.macro_avg && report.macro_avg.f1)} · weighted F1 ${fmt(report.weighted_avg && report.weighted_avg.f1)} · ${report.samples} images`));
  if (report.per_class) wrap.append(perClassTable(report.per_class));
  const cm = report.confusion_matrix;
  if (cm && cm.labels) {
    wrap.append(el("h4", {}, "confusion matrix (rows: true, columns: predicted)"));
    wrap.append(el("div", { class: "heatmap-wrap" }, charts.confusionHeatmap(cm.labels, cm.matrix)));
    wrap.append(confusedPairs(cm));
  }
  return wrap;
}

function perClassTable(perClass) {
  const columns = ["label", "precision", "recall", "f1", "support"];
  const rows = Object.entries(perClass).map(([label, m]) => ({ label, ...m }));
  const table = el("table", { class: "table per-class" });
  const body = el("tbody");
  let sortKey = "label", ascending = true;
  const render = () => {
    rows.sort((a, b) => (a[sortKey] < b[sortKey] ? -1 : a[sortKey] > b[sortKey] ? 1 : 0) * (ascending ? 1 : -1));
    fill(body, ...rows.map((r) => el("tr", {}, ...columns.map((c) => el("td", {}, c === "label" || c === "support" ? r[c] : fmt(r[c]))))));
    for (const th of table.querySelectorAll("th")) th.setAttribute("aria-sort", th.dataset.key === sortKey ? (ascending ? "ascending" : "descending") : "none");
  };
  const head = el("tr", {}, ...columns.map((c) => el("th", { "data-key": c, scope: "col" },
    el("button", { type: "button", onclick: () => { ascending = sortKey === c ? !ascending : c === "label"; sortKey = c; render(); } }, c))));
  table.append(el("thead", {}, head), body);
  render();
  return table;
}

function confusedPairs(cm) {
  const pairs = [];
  cm.matrix.forEach((row, i) => row.forEach((n, j) => { if (i !== j && n > 0) pairs.push([n, cm.labels[i], cm.labels[j]]); }));
  pairs.sort((a, b) => b[0] - a[0]);
  const list = el("ol", { class: "confused" });
  for (const [n, t, p] of pairs.slice(0, 10)) list.append(el("li", {}, `${t} → ${p}: ${n}`));
  return el("div", {}, el("h4", {}, "most confused pairs"), pairs.length ? list : el("p", {}, "none"));
}

// ---- Fine-tune ------------------------------------------------------------------------------
let optionsLoaded = false;
async function loadFinetuneOptions() {
  if (optionsLoaded) return;
  try {
    const [registry, models] = await Promise.all([api("/backbones"), fetchModels(true)]);
    const source = $("#ft-source");
    fill(source, el("optgroup", { label: "backbones" }, ...registry.backbones.map((b) => el("option", { value: b }, b))),
      el("optgroup", { label: "stored models" }, ...Object.keys(models.models || {}).map((m) => el("option", { value: m }, m))));
    fill($("#ft-strategy"), ...registry.strategies.map((s) => el("option", { value: s }, s)));
    $("#ft-strategy").value = registry.strategies.includes("full") ? "full" : registry.strategies[0];
    optionsLoaded = true;
  } catch (err) { showError("#finetune-error", err); }
}

function finetuneConfig() {
  const config = { name: $("#ft-name").value.trim(), source: $("#ft-source").value, strategy: $("#ft-strategy").value };
  const num = (id, key, parse = Number) => { const v = $(id).value.trim(); if (v !== "") config[key] = parse(v); };
  num("#ft-epochs", "epochs", (v) => parseInt(v, 10));
  num("#ft-size", "image_size", (v) => parseInt(v, 10));
  num("#ft-lr", "learning_rate");
  num("#ft-batch", "batch_size", (v) => parseInt(v, 10));
  num("#ft-patience", "patience", (v) => parseInt(v, 10));
  if ($("#ft-augment").value) config.augment = $("#ft-augment").value === "true";
  const extra = $("#ft-extra").value.trim();
  if (extra) Object.assign(config, JSON.parse(extra));
  return config;
}

async function onFinetune(e) {
  e.preventDefault();
  showError("#finetune-error", null);
  try {
    const file = ($("#ft-dataset").files || [])[0];
    if (!file) throw new Error("pick or drop a dataset zip");
    let config;
    try { config = finetuneConfig(); } catch (err) { throw new Error(`advanced config is not valid JSON: ${err.message}`); }
    const form = new FormData();
    form.append("config", JSON.stringify(config));
    form.append("dataset", file);
    const job = await api("/finetune", { method: "POST", body: form });
    await refreshJobs();
    showJob(job.job_id);
  } catch (err) { showError("#finetune-error", err); }
}

// ---- source ranking (the advisor): a durable job like a fine-tune --------------------------
async function onAdvise() {
  showError("#finetune-error", null);
  const box = $("#advice");
  try {
    const file = ($("#ft-dataset").files || [])[0];
    if (!file) throw new Error("pick or drop a dataset zip to rank sources for");
    const form = new FormData();
    form.append("config", "{}");
    form.append("dataset", file);
    const job = await api("/advise", { method: "POST", body: form });
    fill(box, el("p", {}, `ranking stored models as sources (job ${job.job_id})…`));
    let current = job;
    while (!["succeeded", "failed", "cancelled", "interrupted"].includes(current.state)) {
      await new Promise((resolve) => setTimeout(resolve, 1000));
      current = await api(`/advise/${job.job_id}`);
      const p = current.progress || {};
      if (current.state === "running") fill(box, el("p", {}, `ranking… ${p.candidate || current.phase || ""} ${p.step || 0}/${p.steps || "?"}`));
    }
    if (current.state !== "succeeded") throw new Error(`source ranking ${current.state}: ${current.error || ""}`);
    fill(box, adviceView(current.advice || current.eval));
  } catch (err) { fill(box); showError("#finetune-error", err); }
}

function adviceView(advice) {
  const use = (c) => el("button", { type: "button", class: "use-source", onclick: () => {
    const source = $("#ft-source");
    if (![...source.options].some((o) => o.value === c.model)) source.append(el("option", { value: c.model }, c.model));
    source.value = c.model;
    $("#ft-strategy").value = c.recommended_strategy;
  } }, "use");
  const rows = advice.candidates.map((c) => el("tr", { "data-model": c.model },
    el("td", {}, c.rank), el("td", {}, c.model), el("td", {}, fmt(c.logme)), el("td", {}, fmt(c.probe_accuracy)),
    el("td", {}, fmt(c.embed_seconds, 1)), el("td", {}, c.recommended_strategy), el("td", {}, use(c))));
  const curve = (advice.learning_curve || []).map((p) => [p.images, p.accuracy]);
  return el("div", { class: "advice" },
    el("h3", {}, `source ranking (${advice.dataset ? advice.dataset.images + " images" : ""}, ${fmt(advice.seconds, 1)} s)`),
    el("table", { class: "table advice-table" },
      el("thead", {}, el("tr", {}, ...["rank", "model", "LogME", "probe accuracy", "embed s", "strategy", ""].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, ...rows)),
    curve.length ? charts.lineChart([{ name: `probe accuracy (${advice.best})`, points: curve, axis: "right" }],
      { title: "learning curve (best source)", xLabel: "training images", width: 360 }) : null);
}

const eta = (s) => (s === null || s === undefined ? "–" : s > 90 ? `${Math.round(s / 60)} min` : `${Math.round(s)} s`);
async function refreshJobs() {
  let data;
  try { data = await api("/finetune?limit=50"); } catch (err) { showError("#finetune-error", err); return; }
  const body = $("#jobs-table tbody");
  fill(body, ...data.jobs.map((job) => {
    const p = job.progress || {};
    const model = !job.model ? null : typeof job.model === "string" ? job.model : `${job.model.name}:${job.model.version}`;
    const act = (label, fn) => el("button", { type: "button", onclick: () => jobAction(job.job_id, fn) }, label);
    return el("tr", { "data-job": job.job_id, "data-state": job.state },
      el("td", {}, el("a", { href: "#finetune", onclick: (ev) => { ev.preventDefault(); showJob(job.job_id); } }, job.job_id)),
      el("td", {}, job.name || ""), el("td", { class: "state" }, job.state), el("td", {}, job.phase || ""),
      el("td", {}, p.epoch ? `${p.epoch}/${p.epochs || "?"}` : "–"), el("td", {}, p.percent !== undefined ? `${p.percent} %` : "–"),
      el("td", {}, eta(p.eta_s)),
      el("td", {}, model ? el("a", { href: `#models/${encodeURIComponent(model)}`, class: "model-link" }, model) : ""),
      el("td", {}, ["queued", "running"].includes(job.state) ? act("Cancel", "cancel") : null,
        ["failed", "cancelled", "interrupted"].includes(job.state) ? act("Resume", "resume") : null,
        !["queued", "running"].includes(job.state) ? act("Delete", "delete") : null));
  }));
  const open = $("#job-detail").dataset.job;
  if (open) showJob(open, true);
}

async function jobAction(id, action) {
  showError("#finetune-error", null);
  try {
    if (action === "delete") await api(`/finetune/${id}`, { method: "DELETE" });
    else await api(`/finetune/${id}/${action}`, { method: "POST" });
    await refreshJobs();
  } catch (err) { showError("#finetune-error", err); }
}

async function showJob(id, quiet = false) {
  const box = $("#job-detail");
  try {
    const [job, log] = await Promise.all([api(`/finetune/${id}`), api(`/finetune/${id}/log?lines=40`).catch(() => "")]);
    const history = (job.progress && job.progress.history) || [];
    const pts = (key) => history.filter((h) => h[key] !== null && h[key] !== undefined).map((h) => [h.epoch, h[key]]);
    box.dataset.job = id;
    fill(box, el("h3", {}, `job ${id}: ${job.state}`),
      job.error ? el("p", { class: "error-text", role: "alert" }, job.error) : null,
      job.progress && job.progress.recipe ? el("pre", {}, JSON.stringify(job.progress.recipe, null, 1)) : null,
      charts.lineChart([{ name: "train loss", points: pts("train_loss") }, { name: "val loss", points: pts("val_loss") },
        { name: "val accuracy", points: pts("val_accuracy"), axis: "right" }], { title: "live curves" }),
      el("details", { open: true }, el("summary", {}, "log tail"), el("pre", { class: "log" }, log || "(empty)")));
  } catch (err) { if (!quiet) showError("#finetune-error", err); }
}

// ---- Evaluate -------------------------------------------------------------------------------
async function onEvaluate(e) {
  e.preventDefault();
  showError("#evaluate-error", null);
  const out = $("#evaluate-results");
  const form = new FormData();
  const file = ($("#ev-dataset").files || [])[0];
  const path = $("#ev-path").value.trim();
  if (file) form.append("dataset", file);
  if (path) form.append("data_path", path);
  if ($("#ev-model").value) form.append("model", $("#ev-model").value);
  if ($("#ev-compare").value) form.append("compare_with", $("#ev-compare").value);
  fill(out, el("p", {}, "evaluating…"));
  try {
    const report = await api("/evaluate", { method: "POST", body: form });
    const main = reportView(report, $("#ev-model").value || "model");
    if (report.compare_with) {
      const diff = report.difference || {};
      fill(out, main, reportView(report.compare_with, $("#ev-compare").value),
        el("div", { class: "difference" }, el("h4", {}, `difference (on ${report.compared_on ? report.compared_on.samples : "?"} shared images)`),
          el("ul", {}, ...Object.entries(diff).map(([k, v]) => el("li", {}, `${k}: ${v >= 0 ? "+" : ""}${fmt(v)}`)))));
    } else fill(out, main);
  } catch (err) { fill(out); showError("#evaluate-error", err); }
}

// ---- start ----------------------------------------------------------------------------------
function init() {
  $("#api-key").value = sessionStorage.getItem(KEY_ITEM) || "";
  $("#key-state").textContent = sessionStorage.getItem(KEY_ITEM) ? "key set" : "no key";
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("#api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_ITEM, key); else sessionStorage.removeItem(KEY_ITEM);
    $("#key-state").textContent = key ? "key set" : "no key";
    route();
  });
  wireDrop("#classify-drop", $("#classify-files"), true);
  wireDrop("#finetune-drop", $("#ft-dataset"), false);
  wireDrop("#evaluate-drop", $("#ev-dataset"), false);
  $("#classify-form").addEventListener("submit", onClassify);
  $("#finetune-form").addEventListener("submit", onFinetune);
  $("#ft-advise").addEventListener("click", onAdvise);
  $("#evaluate-form").addEventListener("submit", onEvaluate);
  window.addEventListener("hashchange", route);
  route();
}
document.addEventListener("DOMContentLoaded", init);
