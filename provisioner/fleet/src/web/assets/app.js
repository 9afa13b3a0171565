// The fleet view: renders /api/fleet and /api/nodes/NAME, and fetches again whenever the
// server pushes a change. Every value goes into the page as text, never as markup.
"use strict";

const state = { page: 1, per: 100, stage: null, q: "", fetchedAt: 0, timer: null };

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function seconds(s) {
  s = Math.max(0, Math.round(s));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
}

function bytes(n) {
  if (n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function short(digest) {
  return digest ? digest.slice(0, 12) : "-";
}

async function getJson(url) {
  const r = await fetch(url, { headers: { Accept: "application/json" } });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || r.status + " " + r.statusText);
  return body;
}

function stageCell(stage, secondsInStage) {
  return el("td", { class: "stage stage-" + stage, "data-stage": stage },
    stage, " ", el("span", { class: "note elapsed", "data-since": secondsInStage }, seconds(secondsInStage)));
}

function progressBar(n) {
  const pct = Math.round(n.progress * 100);
  return el("progress", { max: 100, value: pct, "aria-label": n.name + " " + pct + "% of the way to ready" });
}

// Elapsed times move on between fetches.
function tick() {
  const since = (Date.now() - state.fetchedAt) / 1000;
  for (const e of document.querySelectorAll(".elapsed")) {
    const stage = e.parentElement.dataset.stage;
    if (stage === "ready" || stage === "failed") continue;
    e.textContent = seconds(Number(e.dataset.since) + since);
  }
}

function main() {
  return document.getElementById("main");
}

function showError(err) {
  main().replaceChildren(el("p", { class: "error", role: "alert" }, "Could not load: " + err.message));
}

function fleetQuery() {
  const p = new URLSearchParams({ page: state.page, per: state.per });
  if (state.stage) p.set("stage", state.stage);
  if (state.q) p.set("q", state.q);
  return p.toString();
}

async function renderFleet() {
  const data = await getJson("/api/fleet?" + fleetQuery());
  state.fetchedAt = Date.now();
  state.page = data.page;
  document.title = "kiln fleet";
  // Re-rendering keeps the keyboard where it was (typing in the search box goes on).
  const focused = document.activeElement ? document.activeElement.id : null;
  const counts = el("div", { class: "counts", role: "group", "aria-label": "Filter by stage" },
    el("button", { type: "button", "aria-pressed": state.stage === null, onclick: () => { state.stage = null; state.page = 1; refresh(); } },
      "all " + data.fleetSize),
    Object.entries(data.counts).map(([stage, n]) =>
      el("button", { type: "button", id: "count-" + stage, "data-count": n, "aria-pressed": state.stage === stage,
        onclick: () => { state.stage = state.stage === stage ? null : stage; state.page = 1; refresh(); } },
        stage + " " + n)));
  const search = el("input", { id: "search", type: "search", placeholder: "node name", value: state.q,
    "aria-label": "Filter by node name", oninput: (e) => { state.q = e.target.value; state.page = 1; debounce(refresh); } });
  const pager = el("span", { class: "pager" },
    el("button", { type: "button", id: "prev", disabled: data.page <= 1, onclick: () => { state.page--; refresh(); } }, "‹ previous"),
    " page " + data.page + " of " + data.pages + " ",
    el("button", { type: "button", id: "next", disabled: data.page >= data.pages, onclick: () => { state.page++; refresh(); } }, "next ›"));
  const rows = data.nodes.map((n) => el("tr", { "data-node": n.name, class: n.stage === "failed" ? "failed" : null },
    el("th", { scope: "row" }, el("a", { href: "/nodes/" + encodeURIComponent(n.name) }, n.name)),
    el("td", { class: "wide" }, n.role || "-"),
    stageCell(n.stage, n.secondsInStage),
    el("td", {}, progressBar(n)),
    el("td", { class: "wide" }, n.bmc),
    el("td", { class: "wide digest", title: n.imageSha256 || "" }, short(n.imageSha256)),
    el("td", { class: "wide" }, n.slot || "-"),
    el("td", { class: "error" }, n.error || "")));
  const eta = data.etaSeconds === undefined ? "" : " · about " + seconds(data.etaSeconds) + " left";
  main().replaceChildren(
    el("h1", {}, "Fleet rollout"),
    el("p", { class: "note" }, "image " + short(data.imageSha256) + " · " + data.matching + " of " + data.fleetSize + " nodes shown" + eta),
    counts,
    el("div", { class: "tools" }, search, pager),
    el("div", { class: "scroll" },
      el("table", { id: "fleet" },
        el("caption", { class: "skip" }, "Nodes of the rollout"),
        el("thead", {}, el("tr", {},
          el("th", { scope: "col" }, "Node"), el("th", { scope: "col", class: "wide" }, "Role"),
          el("th", { scope: "col" }, "Stage"), el("th", { scope: "col" }, "Progress"),
          el("th", { scope: "col", class: "wide" }, "BMC"), el("th", { scope: "col", class: "wide" }, "Image"),
          el("th", { scope: "col", class: "wide" }, "Slot"), el("th", { scope: "col" }, "Last error"))),
        el("tbody", {}, rows))));
  const again = focused && document.getElementById(focused);
  if (again) {
    again.focus();
    if (again.tagName === "INPUT") again.setSelectionRange(again.value.length, again.value.length);
  }
}

async function retry(name) {
  let token = sessionStorage.getItem("kiln-token");
  if (!token) {
    token = window.prompt("Token for actions (kiln fleet serve --token-file):");
    if (!token) return;
  }
  const r = await fetch("/api/nodes/" + encodeURIComponent(name) + "/retry",
    { method: "POST", headers: { Authorization: "Bearer " + token } });
  const body = await r.json().catch(() => ({}));
  const out = document.getElementById("action-result");
  if (r.ok) {
    sessionStorage.setItem("kiln-token", token);
    out.textContent = "retry asked";
  } else {
    if (r.status === 401) sessionStorage.removeItem("kiln-token");
    out.textContent = "refused: " + (body.error || r.status);
  }
}

async function renderNode(name) {
  const n = await getJson("/api/nodes/" + encodeURIComponent(name));
  state.fetchedAt = Date.now();
  document.title = n.name + " · kiln fleet";
  const facts = el("dl", { class: "facts" },
    el("dt", {}, "Stage"), el("dd", { class: "stage stage-" + n.stage, id: "node-stage", "data-stage": n.stage },
      n.stage, " ", el("span", { class: "note elapsed", "data-since": n.secondsInStage }, seconds(n.secondsInStage))),
    el("dt", {}, "Progress"), el("dd", {}, progressBar(n)),
    el("dt", {}, "Role"), el("dd", {}, n.role || "-"),
    el("dt", {}, "Boot MACs"), el("dd", {}, n.macs.join(", ") || "-"),
    el("dt", {}, "BMC"), el("dd", {}, n.bmc),
    el("dt", {}, "Image"), el("dd", { class: "digest" }, n.imageSha256 || "-"),
    el("dt", {}, "Booted slot"), el("dd", {}, n.slot || "-"),
    el("dt", {}, "Installs"), el("dd", {}, n.installs),
    el("dt", {}, "Last phase"), el("dd", {}, n.lastPhase || "-"),
    n.error ? [el("dt", {}, "Error"), el("dd", { class: "error", id: "node-error" }, n.error)] : []);
  const actions = n.stage === "failed"
    ? el("p", { class: "actions" }, el("button", { type: "button", id: "retry", onclick: () => retry(n.name) }, "Retry this node"),
      " ", el("span", { id: "action-result", role: "status" }))
    : null;
  const steps = n.timeline.map((s) => el("tr", { class: s.failure ? "failed" : null, "data-part": s.part },
    el("td", { class: "num" }, "+" + s.offsetSeconds.toFixed(1) + "s"),
    el("td", {}, s.part),
    el("td", {}, s.what, s.failure ? el("div", { class: "error" }, "failed: " + s.failure) : null),
    el("td", { class: "num wide" }, bytes(s.bytes)),
    el("td", { class: "num wide" }, s.durationMs === undefined ? "" : s.durationMs + " ms")));
  main().replaceChildren(...[
    el("p", {}, el("a", { href: "/" }, "‹ all nodes")),
    el("h1", {}, n.name),
    facts,
    actions,
    el("h2", {}, "Boot chain"),
    el("div", { class: "scroll" },
      el("table", { id: "timeline" },
        el("thead", {}, el("tr", {},
          el("th", { scope: "col" }, "When"), el("th", { scope: "col" }, "Part"), el("th", { scope: "col" }, "What"),
          el("th", { scope: "col", class: "wide" }, "Bytes"), el("th", { scope: "col", class: "wide" }, "Took"))),
        el("tbody", {}, steps))),
  ].filter((c) => c !== null));
}

function currentNode() {
  const m = location.pathname.match(/^\/nodes\/(.+)$/);
  return m ? decodeURIComponent(m[1]) : null;
}

let pending = null;
function debounce(f) {
  clearTimeout(pending);
  pending = setTimeout(f, 250);
}

function refresh() {
  const name = currentNode();
  const work = name ? renderNode(name) : renderFleet();
  return work.catch(showError);
}

function listen() {
  const live = document.getElementById("live");
  const events = new EventSource("/api/events");
  events.addEventListener("open", () => { live.textContent = "live"; live.className = "on"; });
  events.addEventListener("change", () => debounce(refresh));
  events.addEventListener("error", () => { live.textContent = "reconnecting…"; live.className = "off"; });
}

document.addEventListener("DOMContentLoaded", () => {
  listen();
  refresh();
  setInterval(tick, 1000);
});
