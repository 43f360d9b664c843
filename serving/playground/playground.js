// The playground: talks to the public API only (GET /v1/models, POST /v1/generate) and draws the
// samples for their data kind. No framework and no build step: this file is served as it is.
"use strict";

const state = { models: [], panels: [] };  // models: /v1/models "models"; panels: one object per panel

const $ = (selector, root = document) => root.querySelector(selector);
const role = (panel, name) => $(`[data-role="${name}"]`, panel.root);

// ---- the API -------------------------------------------------------------------------------

// The API's errors as one readable line: FastAPI's 422 detail is a list of {loc, msg}; other
// errors carry a string.
function errorText(status, body) {
  const detail = body && body.detail !== undefined ? body.detail : body;
  if (Array.isArray(detail)) {
    return `HTTP ${status}: ` + detail.map((d) => {
      const where = (d.loc || []).filter((part) => part !== "body").join(".");
      return where ? `${where}: ${d.msg}` : d.msg;
    }).join("; ");
  }
  return `HTTP ${status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`;
}

async function callApi(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    throw new Error(`the endpoint did not answer (${error.message})`);
  }
  const text = await response.text();
  let parsed = null;
  try { parsed = JSON.parse(text); } catch (_) { parsed = text; }
  if (!response.ok) throw new Error(errorText(response.status, parsed));
  return parsed;
}

async function loadModels() {
  const status = $("#server-status");
  try {
    const answer = await callApi("/v1/models");
    state.models = answer.models;
    const served = state.models.filter((m) => Object.keys(m.budgets).length > 0).length;
    status.textContent = `${state.models.length} model(s), ${served} with a champion`;
    status.className = served ? "ok" : "warn";
  } catch (error) {
    state.models = [];
    status.textContent = `cannot read /v1/models: ${error.message}`;
    status.className = "bad";
  }
  state.panels.forEach(fillModels);
}

// ---- what a model offers -------------------------------------------------------------------

const modelNamed = (name) => state.models.find((m) => m.name === name);
const versionOf = (model, version) => (model ? model.versions.find((v) => v.version === version) : undefined);

// The card (data kind, formats, conditioning) of the version serving `steps`, else the first known.
function cardFor(model, steps) {
  if (!model) return null;
  const held = versionOf(model, model.budgets[String(steps)]);
  if (held && held.card) return held.card;
  const any = model.versions.find((v) => v.card);
  return any ? any.card : null;
}

const FORMAT_OF_KIND = { image: "png", text: "text", rows: "rows", tokens: "tokens" };

function fmt(value, digits = 4) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

// the sample scores the gate recorded beside the NELBO (molecules: validity, FCD), if any
function sampleScores(version) {
  const scores = version.test_sample_scores || {};
  return ["validity", "uniqueness", "novelty", "copy_rate", "fcd"].filter((name) => name in scores)
    .map((name) => ` · ${name} ${fmt(scores[name], name === "fcd" ? 2 : 3)}`).join("");
}

// ---- a panel -------------------------------------------------------------------------------

function makePanel(key, title) {
  const root = $("#panel-template").content.firstElementChild.cloneNode(true);
  root.dataset.panel = key;
  $(".panel-title", root).textContent = title;
  $("#panels").appendChild(root);
  const panel = { key, root };
  // the two radio buttons behave as one group per panel
  role(panel, "by-steps").addEventListener("change", () => { role(panel, "by-quality").checked = false; });
  role(panel, "by-quality").addEventListener("change", () => { role(panel, "by-steps").checked = false; });
  role(panel, "model").addEventListener("change", () => fillBudgets(panel));
  role(panel, "steps").addEventListener("change", () => showConditioning(panel));
  state.panels.push(panel);
  return panel;
}

function fillModels(panel) {
  const select = role(panel, "model");
  const keep = select.value;
  select.replaceChildren(...state.models.map((m) => new Option(m.name, m.name)));
  if (keep && modelNamed(keep)) select.value = keep;
  fillBudgets(panel);
}

function fillBudgets(panel) {
  const model = modelNamed(role(panel, "model").value);
  const select = role(panel, "steps");
  const keep = select.value;
  const budgets = model ? Object.keys(model.budgets).map(Number).sort((a, b) => a - b) : [];
  select.replaceChildren(...budgets.map((T) => new Option(`T=${T}`, String(T))));
  if (budgets.map(String).includes(keep)) select.value = keep;
  else if (model && model.default_steps !== null && budgets.includes(model.default_steps)) {
    select.value = String(model.default_steps);
  }
  showMenu(panel, model);
  showConditioning(panel);
}

// The served budgets with what the gate recorded and what this replica measured: the menu a
// quality target chooses from.
function showMenu(panel, model) {
  const table = role(panel, "menu");
  if (!model) { table.replaceChildren(); return; }
  table.replaceChildren();
  const head = table.insertRow();
  ["T", "version", "forward", "test NELBO (bits)", "latency p50"].forEach((text) => {
    const cell = document.createElement("th");
    cell.textContent = text;
    head.appendChild(cell);
  });
  Object.entries(model.budgets).sort((a, b) => Number(a[0]) - Number(b[0])).forEach(([T, version]) => {
    const v = versionOf(model, version) || {};
    const row = table.insertRow();
    [T, `v${version}`, v.parameterization || "–",
     `${fmt(v.test_nelbo_bits)} ± ${fmt(v.test_nelbo_stderr)}${sampleScores(v)}`,
     v.latency_ms_p50 === null || v.latency_ms_p50 === undefined ? "–" : `${v.latency_ms_p50.toFixed(1)} ms`,
    ].forEach((text) => { row.insertCell().textContent = text; });
  });
  if (model.problem) {
    const row = table.insertRow();
    const cell = row.insertCell();
    cell.colSpan = 5;
    cell.className = "warn";
    cell.textContent = model.problem;
  }
}

function showConditioning(panel) {
  const model = modelNamed(role(panel, "model").value);
  const card = cardFor(model, role(panel, "steps").value);
  role(panel, "prefix-row").hidden = !(card && card.text_prefix);
  role(panel, "clamp-row").hidden = !(card && card.conditioning && !card.text_prefix);
}

function parseIntegers(text, what) {
  const parts = text.split(/[\s,]+/).filter((part) => part !== "");
  const numbers = parts.map(Number);
  const bad = parts.find((part, i) => !Number.isInteger(numbers[i]));
  if (bad !== undefined) throw new Error(`${what}: ${JSON.stringify(bad)} is not an integer`);
  return numbers;
}

// The request body from the panel, the shared number of samples and this click's seed.
function requestOf(panel, seed) {
  const name = role(panel, "model").value;
  const model = modelNamed(name);
  if (!model) throw new Error("no model is served here yet");
  const body = { model: name, num_samples: Number($("#num-samples").value), seed };
  if (role(panel, "by-quality").checked) {
    const bound = role(panel, "quality-max").value;
    if (bound === "") throw new Error("give the test NELBO bound (bits) for a quality target");
    body.quality = { metric: "nelbo_bits", max: Number(bound) };
  } else if (role(panel, "steps").value !== "") {
    body.steps = Number(role(panel, "steps").value);
  }
  const card = cardFor(model, body.steps);
  body.format = card ? FORMAT_OF_KIND[card.data_kind] : "tokens";
  if (!role(panel, "prefix-row").hidden && role(panel, "prefix").value !== "") {
    body.prefix = role(panel, "prefix").value;
  }
  if (!role(panel, "clamp-row").hidden && role(panel, "positions").value.trim() !== "") {
    body.conditioning = { positions: parseIntegers(role(panel, "positions").value, "positions"),
                          tokens: parseIntegers(role(panel, "tokens").value, "tokens") };
  }
  return body;
}

async function generate(panel, seed) {
  const root = panel.root;
  root.dataset.state = "busy";
  role(panel, "error").hidden = true;
  try {
    const body = requestOf(panel, seed);
    const sent = performance.now();
    const answer = await callApi("/v1/generate", body);
    const roundTrip = performance.now() - sent;
    showAnswer(panel, answer, roundTrip);
    root.dataset.state = "done";
  } catch (error) {
    role(panel, "error").textContent = error.message;
    role(panel, "error").hidden = false;
    role(panel, "answer").hidden = true;
    role(panel, "samples").replaceChildren();
    root.dataset.state = "error";
  }
}

function showAnswer(panel, answer, roundTripMs) {
  const model = modelNamed(answer.model);
  const version = versionOf(model, answer.version) || {};
  role(panel, "version").textContent = answer.version;
  role(panel, "alias").textContent = answer.alias;
  role(panel, "answered-steps").textContent = String(answer.steps);
  role(panel, "parameterization").textContent = `${version.parameterization || "–"} (${version.dataset || "–"})`;
  role(panel, "nelbo").textContent = answer.quality
    ? `${fmt(answer.quality.value)} ± ${fmt(answer.quality.stderr)} bits (asked: ${answer.quality.bound_kind} ` +
      `${answer.quality.bound})`
    : `${fmt(version.test_nelbo_bits)} ± ${fmt(version.test_nelbo_stderr)} bits${sampleScores(version)}`;
  role(panel, "latency").textContent = `${(1000 * answer.elapsed_s).toFixed(1)} ms in the server, ` +
    `${roundTripMs.toFixed(1)} ms round trip, ${answer.batch_requests} request(s) in the batch`;
  role(panel, "answer").hidden = false;
  drawSamples(role(panel, "samples"), answer, version.card || cardFor(model, answer.steps));
}

// ---- drawing samples by data kind ----------------------------------------------------------

function drawSamples(box, answer, card) {
  box.replaceChildren();
  box.dataset.kind = answer.format;
  if (answer.format === "png") {
    answer.samples.forEach((data) => {
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${data}`;
      img.alt = "a sampled image";
      box.appendChild(img);
    });
  } else if (answer.format === "text") {
    const pre = document.createElement("pre");
    pre.textContent = answer.samples.join("\n");
    box.appendChild(pre);
  } else if (answer.format === "rows") {
    box.appendChild(rowsTable(answer.samples));
  } else if (card && card.seq_len === 2) {
    box.dataset.kind = "density";
    box.appendChild(densityCanvas(answer.tokens, card.vocab_size));
  } else {
    const pre = document.createElement("pre");
    pre.textContent = answer.tokens.map((row) => row.join(" ")).join("\n");
    box.appendChild(pre);
  }
  const count = document.createElement("p");
  count.className = "count";
  count.textContent = `${answer.tokens.length} sample(s), seed ${answer.seed}`;
  box.appendChild(count);
}

function rowsTable(samples) {
  const table = document.createElement("table");
  const columns = samples.length ? Object.keys(samples[0]) : [];
  const head = table.insertRow();
  columns.forEach((c) => { const th = document.createElement("th"); th.textContent = c; head.appendChild(th); });
  samples.forEach((sample) => {
    const row = table.insertRow();
    columns.forEach((c) => { row.insertCell().textContent = sample[c] === null ? "–" : sample[c]; });
  });
  return table;
}

// Two-token samples as a K x K density: x[1] across, x[0] up (as the PNGs the CLI and demo write);
// darker is more samples.
function densityCanvas(tokens, K) {
  const cell = Math.max(2, Math.floor(256 / K));
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = cell * K;
  const counts = new Array(K * K).fill(0);
  tokens.forEach(([a, b]) => { if (a < K && b < K) counts[a * K + b] += 1; });
  const most = Math.max(1, ...counts);
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff";
  context.fillRect(0, 0, canvas.width, canvas.height);
  counts.forEach((n, i) => {
    if (n === 0) return;
    const shade = Math.round(235 * (1 - Math.sqrt(n / most)));  // sqrt: rare cells stay visible
    context.fillStyle = `rgb(${shade}, ${shade}, ${Math.min(255, shade + 40)})`;
    context.fillRect((i % K) * cell, (K - 1 - Math.floor(i / K)) * cell, cell, cell);
  });
  canvas.title = `${tokens.length} samples on a ${K} x ${K} grid`;
  return canvas;
}

// ---- start ---------------------------------------------------------------------------------

function syncCompare() {
  const second = state.panels[1];
  second.root.hidden = !$("#compare").checked;
  if (!second.root.hidden && !second.touched) {
    // the comparison the product exists for: the same model at another budget, else another model
    const first = state.panels[0];
    const model = modelNamed(role(first, "model").value);
    const other = model && Object.keys(model.budgets).find((T) => T !== role(first, "steps").value);
    if (other) {
      role(second, "model").value = model.name;
      fillBudgets(second);
      role(second, "steps").value = other;
    } else if (state.models.length > 1) {
      role(second, "model").value = state.models.find((m) => !model || m.name !== model.name).name;
      fillBudgets(second);
    }
    showConditioning(second);
  }
}

async function start() {
  makePanel("a", "A");
  const second = makePanel("b", "B");
  second.root.addEventListener("change", () => { second.touched = true; });
  second.root.hidden = true;
  await loadModels();
  $("#compare").addEventListener("change", syncCompare);
  $("#reload").addEventListener("click", loadModels);
  $("#generate").addEventListener("click", async () => {
    // one seed for every panel of a click: an empty field draws one here, so the panels still share it
    const typed = $("#seed").value.trim();
    const seed = typed === "" ? Math.floor(Math.random() * 2 ** 31) : Number(typed);
    const button = $("#generate");
    button.disabled = true;  // one click at a time: a late answer never overwrites a newer one
    try {
      await Promise.all(state.panels.filter((p) => !p.root.hidden).map((p) => generate(p, seed)));
      await loadModels();  // the menus then show the latencies (and versions) these requests added
    } finally {
      button.disabled = false;
    }
  });
  document.body.dataset.ready = "true";
}

start();
