// The playground's logic. Plain ES module, no dependencies: every control is built from what the server
// describes (/v1/models, /v1/accelerators), every request goes to this page's own origin, and image quality
// (PSNR, SSIM, difference) is computed here from the two decoded images.

const $ = (id) => document.getElementById(id);
const AMPLIFY = 8; // the difference image shows |a - b| times this, so small changes are visible
const POLL_MS = 250; // video job polling interval

const state = {
  key: "", // the API key typed on the page (memory only)
  models: {}, // id -> model card
  methods: {}, // name -> {summary, schema, families, limits}
  presets: {}, // name -> {description, spec}
  abort: null, // AbortController of the image request in flight
  videoJob: null, // id of the video job in flight
  cancelled: false,
};

// ---- API -------------------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, param, retryAfter) {
    super(message);
    Object.assign(this, { status, param, retryAfter });
  }
}

// One call to this server: JSON in and out, the key as a Bearer header. A non-2xx answer becomes an ApiError
// carrying the field the server named (`error.param`) and Retry-After.
async function api(path, { method = "GET", body, raw = false, signal } = {}) {
  const headers = {};
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  if (!response.ok) {
    let error = {};
    try { error = (await response.json()).error || {}; } catch { /* not JSON: keep the status */ }
    throw new ApiError(response.status, error.message || `HTTP ${response.status}`, error.param,
      Number(response.headers.get("Retry-After")) || null);
  }
  return raw ? response : response.json();
}

// ---- errors and status -----------------------------------------------------------------------------------------

// The inputs each `error.param` refers to, when its name is not an input's id.
const FIELD_INPUTS = { size: ["width", "height"], "api-key": ["api-key"], acceleration: [] };

function clearErrors() {
  document.querySelectorAll(".error").forEach((el) => { el.textContent = ""; });
  document.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
}

function showError(param, message) {
  const slot = document.querySelector(`.error[data-for="${param}"]`) || document.querySelector('.error[data-for="general"]');
  slot.textContent = message;
  for (const id of FIELD_INPUTS[param] || [param]) $(id)?.classList.add("invalid");
}

// An API failure shown where the user can act on it: next to its field, at the key field, or as "busy".
function reportError(error) {
  if (error.name === "AbortError") return setStatus("cancelled");
  setStatus("");
  if (!(error instanceof ApiError)) return showError("general", String(error));
  if (error.status === 401) return showError("api-key", "this server needs an API key: enter it and press use");
  if (error.status === 429) return showError("general", `busy, retry in ${error.retryAfter ?? "a few"} s`);
  showError(error.param || "general", error.message);
}

function setStatus(text) { $("status").textContent = text; }

function setBusy(busy) {
  $("generate").disabled = $("compare").disabled = busy;
  $("cancel").disabled = !busy;
  if (!busy) $("progress").hidden = true;
}

// ---- controls built from the server's descriptions ------------------------------------------------------------

async function loadListings() {
  clearErrors();
  try {
    const [models, accel] = await Promise.all([api("/v1/models"), api("/v1/accelerators")]);
    state.models = Object.fromEntries(models.data.map((m) => [m.id, m]));
    state.methods = accel.methods;
    state.presets = accel.presets;
  } catch (error) {
    if (error instanceof ApiError && error.status === 503) { // models still loading
      setStatus("models loading…");
      return setTimeout(loadListings, 1000);
    }
    return reportError(error);
  }
  const select = $("model");
  // the page generates from text: models that only edit or animate an uploaded image are left out
  const textModels = Object.values(state.models).filter((m) => (m.tasks || [m.task]).some((t) => t.startsWith("text-to-")));
  select.replaceChildren(...textModels.map((m) => new Option(`${m.id} (${m.task})`, m.id)));
  buildMethods();
  buildPresets();
  modelChanged();
  setStatus("ready");
}

// A model's defaults fill the size, steps and guidance fields; methods not made for its family are disabled.
function modelChanged() {
  const card = state.models[$("model").value];
  if (!card) return;
  const [w, h] = (card.default_size || "x").split("x");
  $("width").value = w; $("height").value = h;
  $("width").step = $("height").step = card.size_multiple || 1;
  $("num_inference_steps").value = card.default_steps ?? "";
  $("guidance_scale").value = card.default_guidance ?? "";
  for (const [name, info] of Object.entries(state.methods)) {
    const usable = !info.families || info.families.includes(card.family);
    const box = $(`use-${name}`);
    box.disabled = !usable;
    if (!usable) box.checked = false;
    box.closest(".method").classList.toggle("unavailable", !usable);
  }
}

function buildPresets() {
  const select = $("preset");
  select.replaceChildren(new Option("custom (the methods below)", ""),
    ...Object.keys(state.presets).map((name) => new Option(name, name)));
  select.value = "off" in state.presets ? "off" : "";
  presetChanged();
}

// A preset is a list of methods with knobs: choosing one sets the method controls to it.
function presetChanged() {
  const preset = state.presets[$("preset").value];
  $("preset-description").textContent = preset ? preset.description : "";
  if (!preset) return;
  const configs = Object.fromEntries(preset.spec.map((c) => [c.method, c]));
  for (const name of Object.keys(state.methods)) {
    $(`use-${name}`).checked = name in configs;
    for (const knob of document.querySelectorAll(`[data-method="${name}"]`)) setKnob(knob, configs[name]?.[knob.dataset.knob]);
  }
  showKnobs();
}

// A knob's JSON schema without its `null` alternative (an optional knob is `anyOf: [T, null]`).
function knobType(schema) {
  const options = (schema.anyOf || [schema]).filter((s) => s.type !== "null");
  return options.length === 1 ? { ...options[0], default: schema.default, description: schema.description } : schema;
}

function buildMethods() {
  const container = $("methods");
  container.replaceChildren();
  for (const [name, info] of Object.entries(state.methods)) {
    const block = document.createElement("div");
    block.className = "method";
    block.innerHTML = `<label title="${escapeHtml(info.summary)}"><input type="checkbox" id="use-${name}"> ${name}</label>
      <div class="knobs" hidden></div>`;
    const knobs = block.querySelector(".knobs");
    for (const [knob, raw] of Object.entries(info.schema.properties)) {
      if (knob === "method") continue;
      knobs.append(knobRow(name, knob, knobType(raw), info.limits?.[knob]));
    }
    container.append(block);
  }
  container.addEventListener("change", () => { $("preset").value = ""; $("preset-description").textContent = ""; showKnobs(); });
}

// One knob: a slider and a number box for a bounded number (the schema's range, narrowed by the server's
// limits), a checkbox for a boolean, a list for an enum, otherwise a text box read as JSON.
function knobRow(method, knob, schema, limits) {
  const row = document.createElement("label");
  row.className = "knob";
  row.title = schema.description || "";
  row.append(knob);
  let input;
  const numeric = schema.type === "number" || schema.type === "integer";
  if (numeric) {
    const low = limits ? limits[0] : schema.minimum ?? schema.exclusiveMinimum;
    const high = limits ? limits[1] : schema.maximum ?? schema.exclusiveMaximum;
    const step = schema.type === "integer" ? 1 : "any";
    input = Object.assign(document.createElement("input"), { type: "number", step });
    if (low !== undefined) input.min = low;
    if (high !== undefined) input.max = high;
    if (low !== undefined && high !== undefined) { // a slider only where the range is known
      const slider = Object.assign(document.createElement("input"), { type: "range", min: low, max: high,
        step: schema.type === "integer" ? 1 : (high - low) / 100 });
      slider.addEventListener("input", () => { input.value = slider.value; });
      input.addEventListener("input", () => { slider.value = input.value; });
      input.slider = slider;
      row.append(slider);
    } else {
      row.append(document.createElement("span"));
    }
  } else if (schema.type === "boolean") {
    input = Object.assign(document.createElement("input"), { type: "checkbox" });
    row.append(document.createElement("span"));
  } else if (schema.enum) {
    input = document.createElement("select");
    input.append(...schema.enum.map((v) => new Option(v, v)));
    row.append(document.createElement("span"));
  } else {
    input = Object.assign(document.createElement("input"), { type: "text", placeholder: JSON.stringify(schema.default ?? null) });
    row.append(document.createElement("span"));
  }
  Object.assign(input.dataset, { method, knob, kind: numeric ? "number" : schema.type === "boolean" ? "bool" : schema.enum ? "enum" : "json" });
  input.id = `knob-${method}-${knob}`;
  input.defaultKnob = schema.default;
  setKnob(input, undefined);
  row.append(input);
  return row;
}

function setKnob(input, value) {
  const v = value === undefined ? input.defaultKnob : value;
  if (input.dataset.kind === "bool") input.checked = Boolean(v);
  else if (input.dataset.kind === "json") input.value = value === undefined || v === null ? "" : JSON.stringify(v);
  else input.value = v ?? "";
  if (input.slider) input.slider.value = input.value;
}

function showKnobs() {
  for (const name of Object.keys(state.methods)) {
    $(`use-${name}`).closest(".method").querySelector(".knobs").hidden = !$(`use-${name}`).checked;
  }
}

// The acceleration spec the controls describe: the checked methods, each with the knobs that differ from
// their defaults (the server fills in the rest). An empty list is no acceleration.
function accelerationSpec() {
  const spec = [];
  for (const name of Object.keys(state.methods)) {
    if (!$(`use-${name}`).checked) continue;
    const config = { method: name };
    for (const input of document.querySelectorAll(`[data-method="${name}"]`)) {
      const kind = input.dataset.kind;
      let value;
      if (kind === "bool") value = input.checked;
      else if (kind === "number") value = input.value === "" ? undefined : Number(input.value);
      else if (kind === "enum") value = input.value;
      else if (input.value.trim() !== "") {
        try { value = JSON.parse(input.value); } catch { value = input.value; }
      }
      if (value !== undefined && JSON.stringify(value) !== JSON.stringify(input.defaultKnob)) config[input.dataset.knob] = value;
    }
    spec.push(config);
  }
  return spec;
}

// Quality target: not offered by the server yet. When it is, read $("quality-target") here and send it.
function qualityTarget() { return undefined; }

// The request body from the form; `seed` is fixed by the caller so both runs of a comparison share it.
function requestBody(seed, acceleration) {
  const body = { model: $("model").value, prompt: $("prompt").value, seed, acceleration };
  const optional = { negative_prompt: $("negative_prompt").value, num_inference_steps: $("num_inference_steps").value,
    guidance_scale: $("guidance_scale").value };
  if (optional.negative_prompt) body.negative_prompt = optional.negative_prompt;
  if (optional.num_inference_steps !== "") body.num_inference_steps = Number(optional.num_inference_steps);
  if (optional.guidance_scale !== "") body.guidance_scale = Number(optional.guidance_scale);
  if ($("width").value && $("height").value) body.size = `${$("width").value}x${$("height").value}`;
  if (qualityTarget() !== undefined) body.quality_target = qualityTarget();
  return body;
}

// ---- running ---------------------------------------------------------------------------------------------------

// One image generation: the decoded image, the server's timings and report, and the wall time seen here.
async function runImage(body) {
  const start = performance.now();
  const answer = await api("/v1/images/generations", { method: "POST", body, signal: state.abort.signal });
  const img = new Image();
  img.src = `data:image/${answer.output_format};base64,${answer.data[0].b64_json}`;
  await img.decode();
  return { img, wall: performance.now() - start, run: answer.timings.run_ms, report: answer.acceleration, seed: answer.seed };
}

// One video job: submitted, polled (progress bar from `base` to `base + share` percent), fetched as a blob.
// The wall time is measured here (the job record has whole-second times only).
async function runVideo(body, base, share) {
  const start = performance.now();
  let job = await api("/v1/videos", { method: "POST", body });
  state.videoJob = job.id;
  while (job.status === "queued" || job.status === "in_progress") {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    if (state.cancelled) throw Object.assign(new Error("cancelled"), { name: "AbortError" });
    job = await api(`/v1/videos/${job.id}`);
    $("progress").value = base + (share * job.progress) / 100;
  }
  if (job.status !== "completed") throw new ApiError(500, job.error?.message || `video ${job.status}`, job.error?.param);
  const content = await api(`/v1/videos/${job.id}/content`, { raw: true });
  const wall = performance.now() - start;
  const video = Object.assign(document.createElement("video"), { controls: true, loop: true, muted: true, autoplay: true });
  video.src = URL.createObjectURL(await content.blob());
  state.videoJob = null;
  return { video, wall, run: null, report: job.acceleration, seed: job.seed };
}

function show(pane, title, result) {
  const el = $(pane);
  el.hidden = false;
  el.querySelector("h2").textContent = title;
  el.querySelector(".media").replaceChildren(result.img || result.video);
  const server = result.run === null ? "" : `run ${result.run.toFixed(0)} ms on the server, `;
  el.querySelector(".timing").textContent = `${server}${result.wall.toFixed(0)} ms wall in the browser`;
}

function fillStats(baseline, accel) {
  $("stats").hidden = false;
  const time = (r) => r.run ?? r.wall; // the server's run time when known: it leaves out transfer and decoding
  $("stat-speedup").textContent = baseline ? `${(time(baseline) / time(accel)).toFixed(2)}×` : "";
  const report = accel.report || {};
  $("stat-fraction").textContent = report.block_fraction_computed === undefined ? ""
    : `${(100 * report.block_fraction_computed).toFixed(1)} %`;
  $("stat-seed").textContent = accel.seed;
  $("stat-report").textContent = JSON.stringify(report, null, 1);
  $("pane-diff").hidden = true;
  $("stat-psnr").textContent = $("stat-ssim").textContent = baseline ? "n/a (video)" : "";
  if (baseline?.img && accel.img) {
    const a = pixels(baseline.img), b = pixels(accel.img);
    const p = psnr(a, b);
    $("stat-psnr").textContent = p === Infinity ? "∞ (identical)" : p.toFixed(2);
    $("stat-ssim").textContent = ssim(a, b).toFixed(4);
    drawDifference(a, b);
  }
}

async function generate(compare) {
  clearErrors();
  setBusy(true);
  state.abort = new AbortController();
  state.cancelled = false;
  const card = state.models[$("model").value];
  const video = card?.task === "text-to-video";
  const seed = $("seed").value === "" ? Math.floor(Math.random() * 2 ** 31) : Number($("seed").value);
  const run = video ? runVideo : runImage;
  $("progress").hidden = !video;
  $("progress").value = 0;
  for (const pane of ["pane-baseline", "pane-accel", "pane-diff"]) $(pane).hidden = true;
  $("stats").hidden = true;
  try {
    let baseline = null;
    if (compare) {
      setStatus("running the baseline (off)…");
      baseline = await run(requestBody(seed, "off"), 0, 50);
      show("pane-baseline", "Baseline (off)", baseline);
    }
    setStatus(compare ? "running the accelerated version…" : "running…");
    const accel = await run(requestBody(seed, accelerationSpec()), compare ? 50 : 0, compare ? 50 : 100);
    show("pane-accel", compare ? "Accelerated" : "Result", accel);
    fillStats(baseline, accel);
    setStatus("done");
  } catch (error) {
    reportError(error);
  } finally {
    setBusy(false);
  }
}

// Cancel: an image request is aborted (the server stops its work when the client goes away); a video job is
// deleted, which stops it wherever it runs.
async function cancel() {
  state.cancelled = true;
  state.abort?.abort();
  const job = state.videoJob;
  state.videoJob = null;
  if (job) await api(`/v1/videos/${job}`, { method: "DELETE" }).catch(() => {});
  setStatus("cancelled");
}

// ---- image comparison ------------------------------------------------------------------------------------------

function pixels(img) {
  const canvas = Object.assign(document.createElement("canvas"), { width: img.naturalWidth, height: img.naturalHeight });
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  return ctx.getImageData(0, 0, canvas.width, canvas.height);
}

// PSNR over the R, G and B channels (8 bit): 10 log10(255² / MSE); identical images give Infinity.
function psnr(a, b) {
  let sum = 0;
  for (let i = 0; i < a.data.length; i += 4) {
    for (let c = 0; c < 3; c++) sum += (a.data[i + c] - b.data[i + c]) ** 2;
  }
  const mse = sum / (3 * a.width * a.height);
  return mse === 0 ? Infinity : 10 * Math.log10((255 * 255) / mse);
}

// SSIM on luminance Y = 0.299 R + 0.587 G + 0.114 B, over non-overlapping 8x8 windows, averaged:
//   SSIM(x, y) = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)),
//   C1 = (0.01 · 255)², C2 = (0.03 · 255)², σ with the 1/N (population) variance.
function ssim(a, b) {
  const luma = (d, i) => 0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2];
  const C1 = (0.01 * 255) ** 2, C2 = (0.03 * 255) ** 2, W = 8;
  let total = 0, windows = 0;
  for (let y0 = 0; y0 + W <= a.height; y0 += W) {
    for (let x0 = 0; x0 + W <= a.width; x0 += W) {
      let sx = 0, sy = 0, sxx = 0, syy = 0, sxy = 0;
      for (let y = y0; y < y0 + W; y++) {
        for (let x = x0; x < x0 + W; x++) {
          const i = 4 * (y * a.width + x);
          const p = luma(a.data, i), q = luma(b.data, i);
          sx += p; sy += q; sxx += p * p; syy += q * q; sxy += p * q;
        }
      }
      const n = W * W, mx = sx / n, my = sy / n;
      const vx = sxx / n - mx * mx, vy = syy / n - my * my, cov = sxy / n - mx * my;
      total += ((2 * mx * my + C1) * (2 * cov + C2)) / ((mx * mx + my * my + C1) * (vx + vy + C2));
      windows++;
    }
  }
  return windows ? total / windows : 1;
}

function drawDifference(a, b) {
  const canvas = $("diff");
  Object.assign(canvas, { width: a.width, height: a.height });
  const ctx = canvas.getContext("2d");
  const out = ctx.createImageData(a.width, a.height);
  for (let i = 0; i < a.data.length; i += 4) {
    for (let c = 0; c < 3; c++) out.data[i + c] = Math.min(255, AMPLIFY * Math.abs(a.data[i + c] - b.data[i + c]));
    out.data[i + 3] = 255;
  }
  ctx.putImageData(out, 0, 0);
  $("amplify").textContent = AMPLIFY;
  $("pane-diff").hidden = false;
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

// ---- wiring ----------------------------------------------------------------------------------------------------

$("model").addEventListener("change", modelChanged);
$("preset").addEventListener("change", presetChanged);
$("generate").addEventListener("click", () => generate(false));
$("compare").addEventListener("click", () => generate(true));
$("cancel").addEventListener("click", cancel);
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("api-key").value.trim();
  loadListings();
});
loadListings();
