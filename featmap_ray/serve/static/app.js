"use strict";
// The page of the reconstruction service (featmap_ray/serve/api.py). It talks only to the app that served
// it, through relative URLs, with no library and no build step, so it works on a machine without internet.

const $ = (id) => document.getElementById(id);

// The body of GET /models: backbone, FeatInv models, mapping runs, defaults and limits.
let service = null;
let activeTab = "reconstruct";

// What the metrics of a reconstruction mean (shown as tooltips).
const METRIC_HELP = {
  cos_median_lower: "median over positions of the cosine between the feature map sampled from and the "
    + "reconstruction's feature map",
  source_top1: "the backbone's top-1 class for the source image",
  top1_match: "the reconstruction's top-1 class is the source image's",
  top5_match: "the source image's top-1 class is among the reconstruction's top-5",
  count: "reconstructions",
  mapped_vs_input_cos_median_lower: "median cosine between the mapped feature map and the uploaded image's own map",
  seconds: "time the service took to sample and score",
};

// ---- talking to the service ---------------------------------------------------------------------------

// An HTML page's words: its tags (with <head>, <script> and <style> whole) dropped as text first, then
// its entities decoded. Parsing its elements, even into a detached document, would apply their inline
// styles, which the page's Content-Security-Policy refuses and reports (featmap_ray/serve/page.py).
function htmlWords(html) {
  const words = html.replace(/<(head|script|style)\b[\s\S]*?<\/\1\s*>/gi, " ").replace(/<[^>]*>/g, " ");
  return new DOMParser().parseFromString(words.replace(/</g, "&lt;"), "text/html").body.textContent;
}

// A readable message out of an error answer: the service's JSON {"error": "..."}; otherwise (Serve's
// proxy, a crash) the answer's text, HTML pages reduced to their words.
function describeError(body, text) {
  if (body && typeof body.error === "string") return body.error;
  const plain = /^\s*</.test(text) ? htmlWords(text) : text;
  return plain.replace(/\s+/g, " ").trim().slice(0, 500) || "the service gave no details";
}

// fetch, returning the JSON body, or throwing an Error whose message a person can read.
async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error(`Cannot reach the service (${err.message}). Is it still running?`);
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    // Not JSON: describeError falls back to the text.
  }
  if (!response.ok) {
    throw new Error(`The service answered ${response.status} ${response.statusText}: ${describeError(body, text)}`);
  }
  if (body === null) throw new Error(`The service answered ${path} with something that is not JSON.`);
  return body;
}

// ---- feedback: progress and errors --------------------------------------------------------------------

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// Shows the spinner with the seconds elapsed, disables Run (one request at a time) and hides the previous
// result (it would read as this request's); returns the function that ends it.
function startProgress(label) {
  const started = performance.now();
  $("results").hidden = true;
  $("progress-text").textContent = label;
  $("elapsed").textContent = "0.0 s";
  $("progress").hidden = false;
  $("run").disabled = true;
  const timer = setInterval(() => {
    $("elapsed").textContent = `${((performance.now() - started) / 1000).toFixed(1)} s`;
  }, 100);
  return () => {
    clearInterval(timer);
    $("progress").hidden = true;
    $("run").disabled = false;
  };
}

// ---- results ------------------------------------------------------------------------------------------

function formatValue(value) {
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toPrecision(4);
  if (value === null || value === undefined) return "–";
  return String(value);
}

// A two-column table of name -> value; each value cell carries data-metric and data-value (the exact
// JSON value, where the text is rounded), for tests and for people copying numbers.
function metricsTable(metrics, table = document.createElement("table")) {
  table.className = "metrics";
  table.replaceChildren();
  for (const [name, value] of Object.entries(metrics)) {
    const row = table.insertRow();
    const th = document.createElement("th");
    th.textContent = name;
    th.title = METRIC_HELP[name] || "";
    row.appendChild(th);
    const td = row.insertCell();
    td.textContent = formatValue(value);
    td.dataset.metric = name;
    td.dataset.value = JSON.stringify(value);
    if (typeof value === "number") td.className = "number";
  }
  return table;
}

// `original` holds the bytes as sent (any format the service decodes), the other images are PNGs.
// Browsers sniff image bytes, but the declared type should still be right where it is known.
function imageSource(base64) {
  const type = base64.startsWith("/9j/") ? "image/jpeg" : "image/png";
  return `data:${type};base64,${base64}`;
}

function describeModel(result) {
  const m = result.model;
  const parts = [`FeatInv model “${m.featinv}”`, m.mlflow_run_id ? `MLflow run ${m.mlflow_run_id}` : m.source,
                 `${m.backbone} / ${m.layer}`];
  if (result.mapping_run) parts.push(`mapping run ${result.mapping_run}`);
  if (result.source_id) parts.push(`stored sample ${result.source_id} / ${result.variant}`);
  const p = result.parameters;
  parts.push(`${p.steps} steps, guidance ${p.guidance}, control scale ${p.control_scale}`);
  return parts.join(" · ");
}

function showResult(result) {
  $("result-title").textContent = result.mapping_run ? "Mapped reconstruction" : "Reconstruction";
  $("result-model").textContent = describeModel(result);
  $("result-original").src = imageSource(result.original);
  $("result-backbone-view").src = imageSource(result.backbone_view);
  const figures = result.reconstructions.map((rec) => {
    const figure = document.createElement("figure");
    figure.className = "reconstruction";
    figure.dataset.seed = rec.seed;
    const img = document.createElement("img");
    img.src = imageSource(rec.image);
    img.alt = `reconstruction, seed ${rec.seed}`;
    const caption = document.createElement("figcaption");
    caption.textContent = `Seed ${rec.seed}`;
    caption.appendChild(metricsTable(rec.metrics));
    figure.append(img, caption);
    return figure;
  });
  $("result-reconstructions").replaceChildren(...figures);
  const extra = { seconds: result.seconds };
  if (result.mapped_vs_input_cos_median_lower !== undefined) {
    extra.mapped_vs_input_cos_median_lower = result.mapped_vs_input_cos_median_lower;
  }
  metricsTable({ ...result.metrics, ...extra }, $("result-metrics"));
  $("results").hidden = false;
}

// ---- the request --------------------------------------------------------------------------------------

// "100, 101 102" -> [100, 101, 102], within the service's limit on seeds per request.
function parseSeeds(text) {
  const parts = text.split(/[\s,]+/).filter(Boolean);
  if (parts.length === 0) throw new Error("Seeds: give at least one integer.");
  for (const p of parts) {
    if (!/^\d+$/.test(p)) throw new Error(`Seeds: "${p}" is not a non-negative integer.`);
  }
  const max = service.limits.max_seeds;
  if (parts.length > max) throw new Error(`Seeds: at most ${max} per request, got ${parts.length}.`);
  return parts;
}

// A number input within [low, high]; empty leaves the service's default.
function bounded(params, name, input, low, high, integer) {
  if (input.value === "") return;
  const value = Number(input.value);
  if (!Number.isFinite(value) || value < low || value > high || (integer && !Number.isInteger(value))) {
    throw new Error(`${name}: give ${integer ? "an integer" : "a number"} from ${low} to ${high}.`);
  }
  params.append(name, input.value);
}

// The sampling settings as the query parameters every POST route takes.
function samplingParams() {
  const limits = service.limits;
  const params = new URLSearchParams({ model: $("model").value });
  for (const seed of parseSeeds($("seeds").value)) params.append("seeds", seed);
  bounded(params, "steps", $("steps"), 1, limits.max_steps, true);
  bounded(params, "guidance", $("guidance"), 0, limits.max_guidance, false);
  bounded(params, "control_scale", $("control-scale"), 0, limits.max_control_scale, false);
  return params;
}

function uploadBody(file) {
  const form = new FormData();
  form.append("file", file);
  return form;
}

// {url, body, label} of the active tab's request; throws a readable error for missing or bad inputs.
function buildRequest() {
  const params = samplingParams();
  const file = $("file-input").files[0];
  if (activeTab === "mapped") {
    if (!$("mapping-run").value) throw new Error("This service has no mapping run to apply.");
    if (!file) throw new Error("Drop or pick an image to map.");
    params.append("run", $("mapping-run").value);
    return { url: `reconstruct/mapped?${params}`, body: uploadBody(file), label: "Mapping and reconstructing…" };
  }
  const sourceId = $("sample-source-id").value.trim();
  if (file) return { url: `reconstruct?${params}`, body: uploadBody(file), label: "Reconstructing…" };
  if (sourceId) {
    params.append("source_id", sourceId);
    params.append("variant", $("sample-variant").value.trim() || "original");
    return { url: `reconstruct/sample?${params}`, body: null, label: "Reconstructing the stored sample…" };
  }
  throw new Error("Drop or pick an image, or give a stored sample's source id.");
}

async function run(event) {
  event.preventDefault();
  clearError();
  let request;
  try {
    request = buildRequest();
  } catch (err) {
    showError(err.message);
    return;
  }
  const stop = startProgress(request.label);
  try {
    showResult(await api(request.url, { method: "POST", body: request.body }));
  } catch (err) {
    showError(err.message);
  } finally {
    stop();
  }
}

// ---- the form -----------------------------------------------------------------------------------------

// A label that also takes a dropped file: the file lands in its <input type=file> as if picked (the
// change event runs the same handlers).
function wireDropZone(zone, input, label) {
  const empty = label.textContent;
  input.addEventListener("change", () => { label.textContent = input.files[0] ? input.files[0].name : empty; });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    if (e.dataTransfer.files.length) {
      input.files = e.dataTransfer.files;
      input.dispatchEvent(new Event("change"));
    }
  });
}

function selectTab(name) {
  activeTab = name;
  for (const tab of ["reconstruct", "mapped"]) {
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    $(`panel-${tab}`).hidden = tab !== name;
  }
}

function describeEntry(entry) {
  const metrics = Object.entries(entry.metrics).map(([k, v]) => `${k} ${formatValue(v)}`).join(", ");
  const run = entry.mlflow_run_id ? `MLflow run ${entry.mlflow_run_id}` : "no MLflow run";
  return metrics ? `${run} · ${metrics}` : run;
}

// Fills the selects, the defaults and the bounds from GET /models.
function applyService(info) {
  service = info;
  const b = info.backbone;
  $("service-info").textContent = `Backbone ${b.name}, layer ${b.layer} (feature map ${b.feature_shape.join("×")})`
    + (info.mlflow_errors.length ? ` · MLflow: ${info.mlflow_errors.join("; ")}` : "");
  $("model").replaceChildren(...info.featinv.map((m) => new Option(m.name, m.name)));
  $("model").value = info.defaults.model;
  const showModel = () => {
    const m = info.featinv.find((entry) => entry.name === $("model").value);
    $("model-info").textContent = `${m.source} · ${describeEntry(m)}`;
  };
  $("model").addEventListener("change", showModel);
  showModel();

  $("mapping-run").replaceChildren(
    ...info.mapping_runs.map((r) => new Option(`${r.manipulation} · ${r.model} · ${r.name}`, r.name)));
  const showRun = () => {
    const r = info.mapping_runs.find((entry) => entry.name === $("mapping-run").value);
    $("mapping-run-info").textContent = r ? describeEntry(r)
      : `No mapping run of study “${info.mapping_study}” is served.`;
  };
  $("mapping-run").addEventListener("change", showRun);
  showRun();

  $("seeds").value = info.defaults.seeds.join(", ");
  for (const [id, key, max] of [["steps", "steps", "max_steps"], ["guidance", "guidance", "max_guidance"],
    ["control-scale", "control_scale", "max_control_scale"]]) {
    $(id).value = info.defaults[key];
    $(id).max = info.limits[max];
  }
  $("run").disabled = false;
}

async function init() {
  $("tab-reconstruct").addEventListener("click", () => selectTab("reconstruct"));
  $("tab-mapped").addEventListener("click", () => selectTab("mapped"));
  wireDropZone($("drop-zone"), $("file-input"), $("drop-label"));
  // An upload and a stored sample exclude each other: whichever was given last is what Run sends.
  $("sample-source-id").addEventListener("input", () => {
    $("file-input").value = "";
    $("file-input").dispatchEvent(new Event("change"));
  });
  $("file-input").addEventListener("change", () => {
    if ($("file-input").files.length) $("sample-source-id").value = "";
  });
  $("form").addEventListener("submit", run);
  try {
    applyService(await api("models"));
  } catch (err) {
    $("service-info").textContent = "The service's models could not be loaded: reload the page to try again.";
    showError(err.message);
  }
}

init();
