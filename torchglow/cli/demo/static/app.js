// torchglow demo page: a thin layer over the JSON API of torchglow/cli/demo/server.py.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, seed: 0, current: null, mix: { a: null, b: null } };

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

// The server answers API requests only with the token it put into this page (cross-site defence).
const TOKEN = document.querySelector('meta[name="torchglow-token"]').content;

async function api(path, body, raw = false) {
  const options = { method: body === undefined ? "GET" : "POST", headers: { "X-Torchglow-Token": TOKEN } };
  if (body !== undefined) {
    options.body = raw ? body : JSON.stringify(body);
    options.headers["Content-Type"] = raw ? "application/octet-stream" : "application/json";
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new Error("the server cannot be reached: is torchglow demo still running?");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `the server answered ${response.status}`);
  return data;
}

// Run `task` now, or once more when the run in flight ends: a slider that moves faster than the
// server answers sends its latest value, never a queue of stale ones.
function live(task) {
  let running = false;
  let again = false;
  return async function run() {
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      await task();
    } catch (e) {
      showError(e.message);
    }
    running = false;
    if (again) {
      again = false;
      run();
    }
  };
}

const fmt = (x, digits = 3) => Number(x).toFixed(digits);
const pct = (x) => `${(100 * x).toFixed(x < 0.1 ? 1 : 0)}%`;

// ------------------------------------------------------------------ samples
const updateSamples = live(async () => {
  const t = parseFloat($("temperature").value);
  const label = $("sample-class").value;
  const r = await api("api/samples", {
    temperature: t, seed: state.seed, label: label === "" ? null : parseInt(label, 10),
  });
  $("samples").src = r.image;
});

// ------------------------------------------------------------------ your image
function drawHistogram(bpd) {
  const hist = state.info.histogram;
  const canvas = $("histogram");
  if (!hist) {
    canvas.hidden = true;
    return;
  }
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 480;
  const h = canvas.clientHeight || 110;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const edges = hist.edges;
  let lo = edges[0];
  let hi = edges[edges.length - 1];
  if (bpd !== null && Number.isFinite(bpd)) {
    const pad = 0.04 * (hi - lo);
    lo = Math.min(lo, bpd - pad);
    hi = Math.max(hi, bpd + pad);
  }
  const plotH = h - 22;
  const x = (v) => 6 + ((v - lo) / (hi - lo)) * (w - 12);
  const top = Math.max(...hist.counts, 1);
  ctx.fillStyle = "#a5b4e8";
  hist.counts.forEach((c, i) => {
    const x0 = x(edges[i]);
    const x1 = x(edges[i + 1]);
    const bh = (c / top) * (plotH - 14);
    ctx.fillRect(x0, plotH - bh, Math.max(1, x1 - x0 - 1), bh);
  });
  ctx.strokeStyle = "#5d6677";
  ctx.beginPath();
  ctx.moveTo(6, plotH + 0.5);
  ctx.lineTo(w - 6, plotH + 0.5);
  ctx.stroke();
  ctx.fillStyle = "#5d6677";
  ctx.font = "11px system-ui, sans-serif";
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  ctx.fillText(fmt(lo, 2), 6, plotH + 4);
  ctx.textAlign = "right";
  ctx.fillText(`${fmt(hi, 2)} bits/dim`, w - 6, plotH + 4);
  ctx.textAlign = "center";
  ctx.fillText(`test images (n=${state.info.n_test})`, w / 2, plotH + 4);
  if (bpd !== null && Number.isFinite(bpd)) {
    ctx.strokeStyle = "#c92a2a";
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.moveTo(x(bpd), 12);
    ctx.lineTo(x(bpd), plotH);
    ctx.stroke();
    ctx.fillStyle = "#c92a2a";
    ctx.textBaseline = "top";
    ctx.textAlign = x(bpd) > w - 70 ? "right" : x(bpd) < 70 ? "left" : "center";
    ctx.fillText("this image", x(bpd), 0);
  }
}

const VERDICTS = {
  typical: "typical for this model",
  unusual: "unusual for this model",
  atypical: "atypical: likely out of distribution",
};

function showScores(r) {
  $("bpd").textContent = fmt(r.bpd);
  $("label-line").hidden = r.label === null;
  if (r.label !== null) $("label").textContent = state.info.class_names[r.label] ?? r.label;
  const readout = $("readout");
  readout.replaceChildren();
  const verdict = $("verdict");
  if (!r.readout) {
    verdict.textContent = "";
    return;
  }
  const o = r.readout;
  verdict.textContent = VERDICTS[o.verdict];
  verdict.className = o.verdict;
  const lines = [
    `${pct(o.percentile / 100)} of the ${state.info.n_test} test images have lower or equal bits/dim`,
    `typicality |bpd − Ĥ| = ${fmt(o.typicality)} (Ĥ = ${fmt(o.h_hat)}, their mean): ` +
      `${pct(o.typicality_tail)} of test images are at least as far from Ĥ`,
    `complexity bpd − PNG bits/dim = ${fmt(o.complexity)}: ${pct(o.complexity_tail)} of test images score as high or higher`,
  ];
  for (const text of lines) {
    const li = document.createElement("li");
    li.textContent = text;
    readout.append(li);
  }
  drawHistogram(o.bpd);
}

function setCurrent(r) {
  clearError();
  state.current = r;
  $("input").src = r.input;
  $("reconstruction").src = r.reconstruction;
  $("edited").src = r.reconstruction;
  showScores(r);
  for (const input of document.querySelectorAll("#sliders input")) {
    input.value = "0";
    input.nextElementSibling.value = "0.00";
  }
  if (!state.mix.a) setSlot("a", r);
  else if (!state.mix.b && state.mix.a.token !== r.token) setSlot("b", r);
}

async function uploadFile(file) {
  const invert = $("invert").checked ? 1 : 0;
  return api(`api/upload?invert=${invert}`, file, true);
}

async function pickTest(index) {
  const r = await api("api/test_image", { index });
  for (const [i, img] of Array.from($("gallery").children).entries()) img.classList.toggle("chosen", i === index);
  return r;
}

// ------------------------------------------------------------------ edit
function alphas() {
  const out = {};
  for (const input of document.querySelectorAll("#sliders input")) {
    const a = parseFloat(input.value);
    if (a !== 0) out[input.dataset.name] = a;
  }
  return out;
}

const updateEdit = live(async () => {
  if (!state.current) return;
  const r = await api("api/edit", { token: state.current.token, alphas: alphas() });
  $("edited").src = r.image;
});

function buildSliders(names) {
  const box = $("sliders");
  if (!names.length) {
    $("edit-hint").textContent = "No attribute directions for this run: its data set has no labels here. " +
      "Start the demo with --directions FILE or --labels-csv FILE.";
    $("reset").hidden = true;
    return;
  }
  for (const name of names) {
    const row = document.createElement("label");
    row.className = "slider";
    const span = document.createElement("span");
    span.textContent = name;
    span.title = name;
    const input = document.createElement("input");
    Object.assign(input, { type: "range", min: "-1", max: "1", step: "0.05", value: "0" });
    input.dataset.name = name;
    const out = document.createElement("output");
    out.value = "0.00";
    input.addEventListener("input", () => {
      out.value = fmt(input.value, 2);
      updateEdit();
    });
    row.append(span, input, out);
    box.append(row);
  }
}

// ------------------------------------------------------------------ mix
const updateMix = live(async () => {
  const { a, b } = state.mix;
  if (!a || !b) return;
  const r = await api("api/mix", { a: a.token, b: b.token, t: parseFloat($("mix-t").value) });
  $("mixed").src = r.image;
});

const updateStrip = live(async () => {
  const { a, b } = state.mix;
  if (!a || !b) return;
  const r = await api("api/mix", { a: a.token, b: b.token, t: null });
  $("strip").src = r.image;
});

function setSlot(slot, r) {
  state.mix[slot] = r;
  $(`mix-${slot}`).src = r.input;
  updateStrip();
  updateMix();
}

// ------------------------------------------------------------------ start
function describe(info) {
  const [c, h, w] = info.image_shape;
  const parts = [
    info.name,
    `${c}×${h}×${w}, ${info.n_bits}-bit, L=${info.levels}, K=${info.steps}, width ${info.hidden_channels}`,
  ];
  if (info.num_classes) parts.push(`${info.num_classes} classes`);
  if (info.n_test) parts.push(`${info.n_test} test images, mean ${fmt(info.h_hat)} bits/dim`);
  if (info.direction_source) parts.push(`directions from ${info.direction_source}`);
  return parts.join(" · ");
}

function wire() {
  $("error-close").addEventListener("click", clearError);
  $("temperature").addEventListener("input", () => {
    $("temperature-value").value = fmt($("temperature").value, 2);
    updateSamples();
  });
  $("new-samples").addEventListener("click", () => {
    state.seed += 1;
    updateSamples();
  });
  $("sample-class").addEventListener("change", updateSamples);
  $("upload").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    event.target.value = "";
    if (!file) return;
    try {
      setCurrent(await uploadFile(file));
    } catch (e) {
      showError(`${file.name}: ${e.message}`);
    }
  });
  for (const slot of ["a", "b"]) {
    $(`upload-${slot}`).addEventListener("change", async (event) => {
      const file = event.target.files[0];
      event.target.value = "";
      if (!file) return;
      try {
        setSlot(slot, await uploadFile(file));
        clearError();
      } catch (e) {
        showError(`${file.name}: ${e.message}`);
      }
    });
  }
  for (const button of document.querySelectorAll(".use-current")) {
    button.addEventListener("click", () => {
      if (state.current) setSlot(button.dataset.slot, state.current);
    });
  }
  $("reset").addEventListener("click", () => {
    if (state.current) setCurrent(state.current);
  });
  $("mix-t").addEventListener("input", () => {
    $("mix-t-value").value = fmt($("mix-t").value, 2);
    updateMix();
  });
}

async function start() {
  wire();
  let info;
  try {
    info = await api("api/info");
  } catch (e) {
    showError(e.message);
    return;
  }
  state.info = info;
  $("model-info").textContent = describe(info);
  if (info.num_classes) {
    $("class-picker").hidden = false;
    info.class_names.forEach((name, i) => $("sample-class").add(new Option(name, String(i))));
  }
  buildSliders(info.directions);
  if (!info.gallery.length) $("gallery-hint").hidden = true;
  info.gallery.forEach((url, i) => {
    const img = document.createElement("img");
    img.src = url;
    img.className = "pixel";
    img.alt = `test image ${i}`;
    img.addEventListener("click", async () => {
      try {
        setCurrent(await pickTest(i));
      } catch (e) {
        showError(e.message);
      }
    });
    $("gallery").append(img);
  });
  drawHistogram(null);
  updateSamples();
  try {
    if (info.gallery.length) setCurrent(await pickTest(0));
    if (info.gallery.length > 1) setSlot("b", await api("api/test_image", { index: 1 }));
  } catch (e) {
    showError(e.message);
  }
}

document.addEventListener("DOMContentLoaded", start);
