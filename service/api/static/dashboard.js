// forcedphot dashboard: light curves (plotly, served by this service), stamps, service status.
// Everything is fetched from this server; an API key, when the service needs one, is kept
// in sessionStorage only.
"use strict";

// as the command line's plot (forcedphot.photometry.plot.FLAGS): the PSF fit, or a saturated, cosmic-ray or bad pixel
const FLAGS = ["psfFlux_flag", "pixelFlags_saturated", "pixelFlags_cr", "pixelFlags_bad"];
// the dashboard's own polling, left out of the request rate and latency it shows
const POLLING = /route="\/(metrics|v1\/info|v1\/jobs)"/;
const COLOURS = { u: "#56b4e9", g: "#009e73", r: "#d55e00", i: "#cc79a7", z: "#0072b2", y: "#e69f00" };
const state = { rows: [], stored: [], binned: [], body: null, id: null, fromApdb: false, lastRequests: null, status: {} };

function headers(extra) {
  const key = sessionStorage.getItem("forcedphot-key");
  return Object.assign(key ? { Authorization: "Bearer " + key } : {}, extra || {});
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({}, options, { headers: headers((options || {}).headers) }));
  if (response.status === 401) {
    document.getElementById("key-panel").hidden = false;
    throw new Error(sessionStorage.getItem("forcedphot-key") ? "the API key was refused: enter another" : "this service needs an API key");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return response;
}

function say(text, error) {
  const message = document.getElementById("message");
  message.textContent = text;
  message.className = error ? "error" : "";
}

const flagged = (row) => FLAGS.some((name) => row[name]);

function numbers(id) {
  const text = document.getElementById(id).value.trim();
  return text === "" ? null : Number(text);
}

// The request as JSON text: a diaObjectId (up to 2**63) does not survive a JavaScript
// number, so it is written as the digits typed, and shown from them.
async function requestBody() {
  const body = {};
  const id = document.getElementById("object-id").value.trim();
  state.id = null;
  state.fromApdb = false;
  if (id) {
    if (!/^-?[0-9]+$/.test(id)) throw new Error("a diaObjectId is an integer");
    const found = await (await api("/v1/objects/" + encodeURIComponent(id))).json();
    body.objects = [{ diaObjectId: 0, ra: found.ra, dec: found.dec }];
    state.id = id;
    state.fromApdb = found.source === "apdb";
  } else {
    const ra = numbers("ra"), dec = numbers("dec");
    if (ra === null || dec === null) throw new Error("give a diaObjectId, or RA and Dec in degrees");
    body.objects = { ra: ra, dec: dec };
  }
  const min = numbers("mjd-min"), max = numbers("mjd-max");
  if (min !== null) body.mjd_min = min;
  if (max !== null) body.mjd_max = max;
  const bands = document.getElementById("bands").value.split(",").map((b) => b.trim()).filter(Boolean);
  if (bands.length) body.bands = bands;
  const baselineMin = numbers("baseline-min"), baselineMax = numbers("baseline-max");
  if (baselineMax !== null) body.baseline = Object.assign({ mjd_max: baselineMax }, baselineMin !== null ? { mjd_min: baselineMin } : {});
  const text = JSON.stringify(body);
  return state.id === null ? text : text.replace('"diaObjectId":0', '"diaObjectId":' + state.id);
}

async function search(event) {
  event.preventDefault();
  try {
    say("measuring...");
    state.body = await requestBody();
    const response = await api("/v1/lightcurves", {
      method: "POST", body: state.body,
      headers: { "Content-Type": "application/json", Accept: "application/json" },
    });
    if (response.status === 202) {
      say("a large request: accepted as job " + (await response.json()).id + "; see Recent jobs");
      return;
    }
    state.rows = await response.json();
    // what the APDB holds for this DiaObject, drawn beside the fresh measurements
    state.stored = state.fromApdb ? await (await api("/v1/objects/" + encodeURIComponent(state.id) + "/forced-sources")).json() : [];
    state.binned = await binned();
    if (!state.rows.length && !state.stored.length) {
      clearResults();  // no empty 0-1 axes, no stamps of the previous object
      say(response.headers.get("X-Note") || "no exposure covers this position (in this time range and these bands)");
      return;
    }
    const noBaseline = state.body.includes('"baseline"') && state.rows.every((r) => r.psfFluxCorrected === null);
    say(state.rows.length + " measurements on " + response.headers.get("X-Epochs") + " exposures" +
        (state.binned.length ? " in " + state.binned.length + " bins" : "") +
        (noBaseline ? "; no baseline: fewer than 10 good epochs in its window" : "") +
        (state.fromApdb ? "; " + state.stored.length + " DiaForcedSources stored in the APDB" : ""));
    draw();
    refreshStatus();
  } catch (error) {
    say(error.message, true);
  }
}

// the bins asked for, measured by a second request of the same body with "bin"
async function binned() {
  const bin = document.getElementById("bin").value;
  if (!bin || !state.rows.length) return [];
  const body = state.body.slice(0, -1) + ',"bin":' + (bin === "night" ? '"night"' : '{"days":' + Number(bin) + "}") + "}";
  const response = await api("/v1/lightcurves", {
    method: "POST", body: body, headers: { "Content-Type": "application/json", Accept: "application/json" },
  });
  return response.status === 200 ? response.json() : [];
}

// what a point shows: [value, error] of the difference (kind "psf") or science flux, in
// the view chosen: fluxes (baseline-corrected where a baseline was subtracted) or AB
// magnitudes (null for an upper limit, drawn at its 5-sigma limit instead)
function value(row, kind) {
  if (document.getElementById("view").value === "mag") return [row[kind + "Mag"], row[kind + "MagErr"]];
  if (kind === "psf" && row.psfFluxCorrected !== undefined && row.psfFluxCorrected !== null) {
    return [row.psfFluxCorrected, row.psfFluxErrRescaled];
  }
  return [row[kind + "Flux"], row[kind + "FluxErr"]];
}

function isLimit(row, kind) {
  return document.getElementById("view").value === "mag" && row[kind === "psf" ? "isUpperLimit" : "scienceIsUpperLimit"] === true;
}

function traces(kind, axis) {
  const out = [];
  const groups = {};
  state.rows.forEach((row, index) => {
    const key = row.band + (isLimit(row, kind) ? " limit" : flagged(row) ? " flagged" : "");
    (groups[key] = groups[key] || []).push(index);
  });
  for (const [key, indices] of Object.entries(groups)) {
    const band = key.split(" ")[0];
    const limit = key.endsWith("limit");
    const rows = indices.map((i) => state.rows[i]);
    out.push({
      type: "scatter", mode: "markers", name: (axis === "y" ? "" : "science ") + key, xaxis: "x", yaxis: axis,
      x: rows.map((r) => r.midpointMjdTai),
      y: rows.map((r) => (limit ? r[kind + "MagLim5Sigma"] : value(r, kind)[0])),
      error_y: { type: "data", array: rows.map((r) => (limit ? 0 : value(r, kind)[1])), visible: !limit },
      customdata: indices,
      marker: { color: COLOURS[band] || "#555", symbol: limit ? "triangle-down-open" : key.endsWith("flagged") ? "x-open" : "circle", size: 7 },
      hovertext: rows.map((r) => {
        const flags = Object.keys(r).filter((k) => k.startsWith("pixelFlags_") && r[k]).join(" ") || "none";
        return "visit " + r.visit + " detector " + r.detector + "<br>status: " + (state.status[r.epochStatus] || r.epochStatus) +
          (limit ? "<br>upper limit: 5-sigma limiting magnitude" : "") + "<br>flags: " + flags + (r.psfFlux_flag ? " psfFlux_flag" : "");
      }),
      hoverinfo: "x+y+text",
    });
  }
  return out;
}

function binTraces(kind, axis) {
  const groups = {};
  state.binned.forEach((row) => (groups[row.band] = groups[row.band] || []).push(row));
  return Object.entries(groups).map(([band, rows]) => {
    const shown = rows.filter((r) => value(r, kind)[0] !== null || isLimit(r, kind));
    return {
      type: "scatter", mode: "markers", name: (axis === "y" ? "" : "science ") + band + " bins", xaxis: "x", yaxis: axis,
      x: shown.map((r) => r.midpointMjdTai),
      y: shown.map((r) => (isLimit(r, kind) ? r[kind + "MagLim5Sigma"] : value(r, kind)[0])),
      error_y: { type: "data", array: shown.map((r) => (isLimit(r, kind) ? 0 : value(r, kind)[1])), visible: true },
      marker: { color: COLOURS[band] || "#555", symbol: "square-open", size: 11, line: { width: 2 } },
      hovertext: shown.map((r) => r.nEpochs + " epochs, MJD " + r.mjdMin.toFixed(3) + " - " + r.mjdMax.toFixed(3)),
      hoverinfo: "x+y+text",
    };
  });
}

function storedTraces() {
  if (!state.stored.length) return [];
  const trace = (column, axis) => ({
    type: "scatter", mode: "markers", name: (axis === "y" ? "" : "science ") + "stored in the APDB", xaxis: "x", yaxis: axis,
    x: state.stored.map((r) => r.midpointMjdTai), y: state.stored.map((r) => r[column]),
    error_y: { type: "data", array: state.stored.map((r) => r[column + "Err"]), visible: true },
    marker: { color: "#000", symbol: "diamond-open", size: 9 },
    hovertext: state.stored.map((r) => "stored: visit " + r.visit + " detector " + r.detector + " band " + r.band), hoverinfo: "x+y+text",
  });
  return [trace("psfFlux", "y"), trace("scienceFlux", "y2")];
}

function draw() {
  const plot = document.getElementById("plot");
  // titles as {text}: the bundled plotly.js ignores plain strings; MJD written in full (no "61.04k")
  const mjd = { tickformat: ".1f", hoverformat: ".5f", separatethousands: false };
  const mags = document.getElementById("view").value === "mag";
  const corrected = state.rows.some((r) => r.psfFluxCorrected !== undefined && r.psfFluxCorrected !== null);
  const layout = {
    grid: { rows: 2, columns: 1, shared_xaxes: true }, margin: { t: 30, r: 10 }, hovermode: "closest",
    xaxis: Object.assign({ title: { text: "midpoint, MJD (TAI)" }, anchor: "y2" }, mjd),
    yaxis: mags ? { title: { text: "difference magnitude psfMag [AB]" }, autorange: "reversed" }
      : { title: { text: corrected ? "difference flux less baseline psfFluxCorrected [nJy]" : "difference flux psfFlux [nJy]" } },
    yaxis2: mags ? { title: { text: "science magnitude scienceMag [AB]" }, autorange: "reversed" }
      : { title: { text: "science flux scienceFlux [nJy]" } },
    annotations: [
      { text: "difference image", xref: "paper", yref: "y domain", x: 0, y: 1.08, showarrow: false, xanchor: "left" },
      { text: "science (direct) image", xref: "paper", yref: "y2 domain", x: 0, y: 1.08, showarrow: false, xanchor: "left" },
    ],
  };
  const stored = mags ? [] : storedTraces();
  Plotly.newPlot(plot, traces("psf", "y").concat(traces("science", "y2"), binTraces("psf", "y"), binTraces("science", "y2"), stored),
                 layout, { displaylogo: false });
  plot.on("plotly_click", (event) => {
    if (event.points[0].customdata !== undefined) showStamps(event.points[0].customdata);
  });
  plot.on("plotly_selected", chooseBaseline);
  table();
  document.getElementById("downloads").hidden = false;
}

// a box drawn on the plot (the modebar's box select) makes its time range the baseline window
function chooseBaseline(event) {
  if (!event || !event.range || !event.range.x) return;
  const [lo, hi] = event.range.x;
  document.getElementById("baseline-min").value = lo.toFixed(5);
  document.getElementById("baseline-max").value = hi.toFixed(5);
  document.getElementById("search").requestSubmit();
}

function clearResults() {
  Plotly.purge(document.getElementById("plot"));
  document.getElementById("stamps").hidden = true;
  document.getElementById("downloads").hidden = true;
  document.querySelector("#rows thead").innerHTML = "";
  document.querySelector("#rows tbody").innerHTML = "";
}

function table() {
  const columns = ["diaObjectId", "visit", "detector", "band", "midpointMjdTai", "psfFlux", "psfFluxErr", "scienceFlux", "scienceFluxErr",
    "psfMag", "psfMagLim5Sigma", "epochStatus"];
  const head = document.querySelector("#rows thead");
  head.innerHTML = "<tr>" + columns.map((c) => "<th>" + c + "</th>").join("") + "<th>flagged</th></tr>";
  const body = document.querySelector("#rows tbody");
  body.innerHTML = "";
  state.rows.forEach((row, index) => {
    const tr = document.createElement("tr");
    if (flagged(row)) tr.className = "flagged";
    tr.innerHTML = columns.map((c) => "<td>" + (c === "diaObjectId" && state.id !== null ? state.id : format(row[c], c)) + "</td>").join("") + "<td>" + (flagged(row) ? "yes" : "") + "</td>";
    tr.addEventListener("click", () => showStamps(index));
    body.appendChild(tr);
  });
}

function format(value, column) {
  if (column === "midpointMjdTai" && typeof value === "number") return value.toFixed(5);  // 1 s, not 0.1 d
  if (typeof value === "number" && !Number.isInteger(value)) return value.toPrecision(6);
  return value === null || value === undefined ? "" : String(value);
}

async function showStamps(index) {
  const row = state.rows[index];
  const panel = document.getElementById("stamps");
  panel.hidden = false;
  document.getElementById("stamp-caption").textContent =
    "visit " + row.visit + ", detector " + row.detector + ", " + row.band + ", MJD " + row.midpointMjdTai.toFixed(4);
  for (const kind of ["science", "difference"]) {
    const query = new URLSearchParams({ visit: row.visit, detector: row.detector, ra: row.ra, dec: row.dec, size: 48, kind: kind });
    try {
      const blob = await (await api("/v1/stamps?" + query, { headers: { Accept: "image/png" } })).blob();
      document.getElementById("stamp-" + kind).src = URL.createObjectURL(blob);
    } catch (error) {
      say(kind + " stamp: " + error.message, true);
    }
  }
}

async function openJob(event) {
  // a job's status, and its result as a download once it has one
  event.preventDefault();
  try {
    const job = await (await api("/v1/jobs/" + event.target.dataset.job)).json();
    say("job " + job.id + ": " + job.state + (job.rows !== null && job.rows !== undefined ? ", " + job.rows + " rows" : "") +
        (job.errors && job.errors.length ? ", " + job.errors.length + " exposure(s) not measured" : ""));
    if (job.result) {
      const link = document.createElement("a");
      link.href = URL.createObjectURL(await (await api(job.result)).blob());
      link.download = "job-" + job.id + ".parquet";
      link.click();
    }
  } catch (error) {
    say(error.message, true);
  }
}

async function download(event) {
  event.preventDefault();
  const fmt = event.target.dataset.format;
  const media = { parquet: "application/vnd.apache.parquet", csv: "text/csv", ecsv: "text/x-ecsv" }[fmt];
  try {
    const response = await api("/v1/lightcurves", {
      method: "POST", body: state.body, headers: { "Content-Type": "application/json", Accept: media },
    });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = "lightcurve." + fmt;
    link.click();
  } catch (error) {
    say(error.message, true);
  }
}

function metric(text, name, leaveOut) {
  let total = 0, found = false;
  for (const line of text.split("\n")) {
    if (leaveOut && leaveOut.test(line)) continue;
    if (line.startsWith(name + " ") || line.startsWith(name + "{")) {
      total += Number(line.split(" ").pop());
      found = true;
    }
  }
  return found ? total : null;
}

async function refreshStatus() {
  try {
    const info = await (await api("/v1/info")).json();
    const metrics = await (await api("/metrics")).text();
    document.getElementById("version").textContent = "version " + info.version;
    const requests = metric(metrics, "forcedphot_http_requests_total", POLLING);
    const now = performance.now();
    let rate = "";
    if (state.lastRequests) rate = ((requests - state.lastRequests[0]) / ((now - state.lastRequests[1]) / 1000)).toFixed(2) + " /s";
    state.lastRequests = [requests, now];
    const seconds = metric(metrics, "forcedphot_http_request_duration_seconds_sum", POLLING);
    const count = metric(metrics, "forcedphot_http_request_duration_seconds_count", POLLING);
    const items = {
      backend: info.backend.name + ":" + info.backend.device,
      "measurement processes": info.measure_processes,
      "indexed exposures": info.index ? info.index.exposures : "",
      "exposure cache": ((metric(metrics, "forcedphot_exposure_cache_bytes") || 0) / 2 ** 20).toFixed(1) + " MiB",
      "requests answered (not counting this page's polling)": requests,
      "request rate": rate || "(measuring)",
      "mean latency": count ? (1000 * seconds / count).toFixed(1) + " ms" : "",
      "in flight": metric(metrics, "forcedphot_measurements_in_flight"),
    };
    if (info.demo_repository) items["demo repository"] = info.demo_repository;
    state.status = info.epoch_status || {};
    document.getElementById("status-list").innerHTML =
      Object.entries(items).map(([k, v]) => "<dt>" + k + "</dt><dd>" + v + "</dd>").join("");
    const jobs = await (await api("/v1/jobs?limit=5")).json();
    document.getElementById("jobs").innerHTML = jobs.jobs.map((j) =>
      '<li><a href="#" data-job="' + j.id + '">' + j.id.slice(0, 8) + "</a> " + j.state + " " + Math.round(100 * j.progress.fraction) +
      "%</li>").join("") || "<li>none</li>";
    document.querySelectorAll("#jobs a").forEach((a) => a.addEventListener("click", openJob));
  } catch (error) {
    say(error.message, true);
  }
}

document.getElementById("search").addEventListener("submit", search);
document.getElementById("view").addEventListener("change", () => state.rows.length && draw());
document.querySelectorAll("#downloads a").forEach((a) => a.addEventListener("click", download));
document.getElementById("use-key").addEventListener("click", () => {
  sessionStorage.setItem("forcedphot-key", document.getElementById("key").value);
  document.getElementById("key-panel").hidden = true;
  say("");  // the refusal, if any, is answered: refreshStatus says so again if this key is refused too
  refreshStatus();
});
refreshStatus();
setInterval(refreshStatus, 5000);
