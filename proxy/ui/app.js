// memlane's memory page: plain JavaScript over the HTTP API (docs/api.md), no build step.
// Every request carries the key from session storage as `Authorization: Bearer`. Text that comes
// from the store (memories, prompts, answers) is only ever set with textContent, never as HTML.
"use strict";

const KEY_ITEM = "memlane.key";
const PAGE = 50;
const INTERACTION_PAGE = 20;
const SCORE_PARTS = ["vector", "text", "recency", "importance", "confidence", "frequency", "tier", "link"];
const TIERS = ["SHORT_TERM", "LONG_TERM", "PERSISTENT"];

const view = {
  memories: [], query: "", tier: "", offset: 0, hasMore: false,
  interactionsOffset: 0,
};

// -- DOM helpers ---------------------------------------------------------------------------

function $(selector) {
  return document.querySelector(selector);
}

// el("td", {class: "x"}, "text", child): strings become text nodes, so nothing is parsed as HTML.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== false && value !== null && value !== undefined) node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function say(message, kind) {
  const status = $("#status");
  status.textContent = message || "";
  status.className = kind || "";
}

function when(iso) {
  if (!iso) return "";
  const date = new Date(iso.endsWith("Z") ? iso : iso + "Z"); // the API's times are UTC without a suffix
  return isNaN(date) ? iso : date.toLocaleString();
}

function fixed(value, digits) {
  return typeof value === "number" ? value.toFixed(digits) : "";
}

// -- the API -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error && body.error.code;
  }
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  const headers = Object.assign({}, opts.headers || {});
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) headers["Authorization"] = "Bearer " + key;
  if (opts.json !== undefined) {
    headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(opts.json);
    delete opts.json;
  }
  opts.headers = headers;
  const response = await fetch(path, opts);
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, body);
  }
  return opts.raw ? response : response.json();
}

// -- start, key form -----------------------------------------------------------------------

async function start() {
  try {
    await api("/v1/memories?limit=1");
  } catch (err) {
    if (err.status === 401) return showLogin(sessionStorage.getItem(KEY_ITEM) ? err.message : "");
    return say(err.message, "error");
  }
  showApp();
}

function showLogin(message) {
  $("#login").hidden = false;
  $("#tabs").hidden = true;
  $("#logout").hidden = true;
  for (const panel of document.querySelectorAll(".panel")) panel.hidden = true;
  say(message, message ? "error" : "");
  $("#key").focus();
}

function showApp() {
  $("#login").hidden = true;
  $("#tabs").hidden = false;
  $("#logout").hidden = !sessionStorage.getItem(KEY_ITEM);
  $("#who").textContent = sessionStorage.getItem(KEY_ITEM) ? "signed in with a key" : "open mode (no keys configured)";
  say("");
  showTab("memories");
}

function showTab(name) {
  for (const button of document.querySelectorAll("#tabs button")) {
    button.classList.toggle("active", button.dataset.tab === name);
  }
  for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.id !== name;
  if (name === "memories") loadMemories(true);
  if (name === "interactions") loadInteractions(0);
  if (name === "adapters") loadAdapters();
}

// -- memories ------------------------------------------------------------------------------

async function loadMemories(reset) {
  if (reset) { view.offset = 0; view.memories = []; }
  const params = new URLSearchParams();
  if (view.tier) params.set("tier", view.tier);
  let page;
  try {
    if (view.query) {
      params.set("q", view.query);
      params.set("limit", "20");
      page = await api("/v1/memories?" + params);
    } else {
      params.set("limit", String(PAGE));
      params.set("offset", String(view.offset));
      page = await api("/v1/memories?" + params);
    }
  } catch (err) {
    return say(err.message, "error");
  }
  view.memories = view.memories.concat(page.data);
  view.hasMore = page.has_more;
  view.offset += page.data.length;
  renderMemories();
}

function renderMemories() {
  const caption = view.query
    ? `${view.memories.length} best matches for “${view.query}”`
    : `${view.memories.length}${view.hasMore ? "+" : ""} memories, newest first`;
  $("#memories-caption").textContent = caption;
  const rows = view.memories.map(memoryRow);
  if (!rows.length) rows.push(el("tr", {}, el("td", {colspan: 8, class: "empty"}, "No memories yet.")));
  $("#memory-table tbody").replaceChildren(...rows);
  $("#memories-more").hidden = !view.hasMore;
}

function memoryRow(memory) {
  const conf = memory.confidence || {};
  const labels = [].concat(memory.tags || [], memory.domains || []);
  return el("tr", {dataset: {id: memory.id}, class: "memory"},
    el("td", {class: "content-cell"},
      el("div", {class: "content"}, memory.content),
      labels.length ? el("div", {class: "labels"}, labels.map((t) => el("span", {class: "label"}, t))) : null),
    el("td", {}, el("span", {class: "tier tier-" + memory.tier}, memory.tier)),
    el("td", {}, memory.memory_type),
    el("td", {class: "num", title: `corroborated ${conf.corroboration_count || 0}×, contradicted ${conf.contradiction_count || 0}×`},
      fixed(conf.overall, 2)),
    el("td", {class: "num"}, fixed(memory.importance, 2)),
    el("td", {class: "num"}, memory.score ? scoreCell(memory.score) : "–"),
    el("td", {class: "when"}, when(memory.updated_at)),
    el("td", {class: "actions"},
      el("button", {type: "button", class: "edit", onclick: () => editRow(memory)}, "Edit"),
      el("button", {type: "button", class: "delete", onclick: () => deleteMemory(memory)}, "Delete")));
}

function scoreCell(score) {
  const parts = SCORE_PARTS.map((name) => el("div", {class: "part"},
    el("span", {class: "part-name"}, name),
    bar(score[name]),
    el("span", {class: "part-value"}, fixed(score[name], 2))));
  if (score.via) parts.push(el("div", {class: "via"}, "brought in by a link from " + score.via));
  return el("details", {class: "score"},
    el("summary", {}, fixed(score.total, 2)),
    el("div", {class: "parts"}, parts));
}

// A 0-1 value as a bar. The width is set through the CSSOM: the page's policy forbids style attributes.
function bar(value) {
  const fill = el("span", {});
  fill.style.width = Math.round(Math.max(0, Math.min(1, value || 0)) * 100) + "%";
  return el("span", {class: "bar"}, fill);
}

function editRow(memory) {
  const row = document.querySelector(`tr[data-id="${CSS.escape(memory.id)}"]`);
  const text = el("textarea", {class: "edit-content", rows: 3, maxlength: 2000});
  text.value = memory.content;
  const tier = el("select", {class: "edit-tier"}, TIERS.map((t) => el("option", {value: t, selected: t === memory.tier}, t)));
  const importance = el("input", {class: "edit-importance", type: "number", min: 0, max: 1, step: 0.05, value: memory.importance});
  const save = el("button", {type: "button", class: "save"}, "Save");
  const cancel = el("button", {type: "button", class: "cancel", onclick: renderMemories}, "Cancel");
  save.addEventListener("click", async () => {
    const changes = {};
    if (text.value.trim() !== memory.content) changes.content = text.value;
    if (tier.value !== memory.tier) changes.tier = tier.value;
    if (Number(importance.value) !== memory.importance) changes.importance = Number(importance.value);
    if (!Object.keys(changes).length) return renderMemories();
    try {
      const updated = await api("/v1/memories/" + encodeURIComponent(memory.id), {method: "PATCH", json: changes});
      view.memories = view.memories.map((m) => (m.id === memory.id ? Object.assign(updated, {score: m.score}) : m));
      renderMemories();
      say("Saved.", "ok");
    } catch (err) {
      say(err.message, "error");
    }
  });
  row.replaceChildren(el("td", {colspan: 8, class: "editing"},
    text,
    el("div", {class: "toolbar"},
      el("label", {}, "Tier ", tier), el("label", {}, "Importance ", importance), save, cancel)));
  text.focus();
}

async function deleteMemory(memory) {
  if (!window.confirm("Delete this memory for good?\n\n" + memory.content)) return;
  try {
    const result = await api("/v1/memories/" + encodeURIComponent(memory.id), {method: "DELETE"});
    const gone = new Set([result.id].concat(result.derived || []));
    view.memories = view.memories.filter((m) => !gone.has(m.id));
    view.offset = Math.max(0, view.offset - gone.size);
    renderMemories();
    say(gone.size > 1 ? `Deleted, with ${gone.size - 1} derived memories.` : "Deleted.", "ok");
  } catch (err) {
    say(err.message, "error");
  }
}

async function exportMemories() {
  const format = $("#export-format").value;
  try {
    const response = await api("/v1/memories/export?format=" + format, {raw: true});
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", {href: url, download: "memlane-memories." + format});
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    say("Export downloaded.", "ok");
  } catch (err) {
    say(err.message, "error");
  }
}

// -- interactions --------------------------------------------------------------------------

async function loadInteractions(offset) {
  let page;
  try {
    page = await api(`/v1/interactions?limit=${INTERACTION_PAGE}&offset=${offset}`);
  } catch (err) {
    return say(err.message, "error");
  }
  view.interactionsOffset = offset;
  const rows = page.data.map((i) => el("tr", {class: "interaction"},
    el("td", {class: "when"}, when(i.created_at)),
    el("td", {}, i.model),
    el("td", {class: i.status_code >= 400 ? "num bad" : "num"}, i.status_code, i.error ? el("div", {class: "muted"}, i.error) : null),
    el("td", {class: "num"}, fixed(i.latency_ms, 0) + " ms"),
    el("td", {class: "text"}, i.prompt),
    el("td", {class: "text"}, i.answer)));
  if (!rows.length) rows.push(el("tr", {}, el("td", {colspan: 6, class: "empty"}, "No interactions logged yet.")));
  $("#interaction-table tbody").replaceChildren(...rows);
  $("#interactions-newer").disabled = offset === 0;
  $("#interactions-older").disabled = !page.has_more;
}

// -- adapters ------------------------------------------------------------------------------

// The personal adapters' versions, from GET /v1/adapters (empty until one is trained; a server
// older than that endpoint answers 404, shown the same way).
async function fetchAdapters() {
  try {
    const page = await api("/v1/adapters");
    return page.data || [];
  } catch (err) {
    if (err.status === 404) return [];
    throw err;
  }
}

async function loadAdapters() {
  let adapters;
  try {
    adapters = await fetchAdapters();
  } catch (err) {
    return say(err.message, "error");
  }
  const list = $("#adapter-list");
  if (!adapters.length) return list.replaceChildren(el("p", {class: "empty"}, "adapters: none yet"));
  list.replaceChildren(el("table", {},
    el("tbody", {}, adapters.map((a) => el("tr", {class: "adapter"},
      Object.entries(a).filter(([, v]) => v === null || typeof v !== "object")
        .map(([k, v]) => el("td", {}, el("span", {class: "muted"}, k + ": "), v === null ? "–" : String(v))))))));
}

// -- wiring --------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_ITEM, $("#key").value.trim());
    $("#key").value = "";
    start();
  });
  $("#logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_ITEM);
    $("#who").textContent = "";
    showLogin("");
  });
  for (const button of document.querySelectorAll("#tabs button")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }
  $("#search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    view.query = $("#q").value.trim();
    view.tier = $("#tier").value;
    loadMemories(true);
  });
  $("#clear").addEventListener("click", () => {
    $("#q").value = "";
    view.query = "";
    view.tier = $("#tier").value;
    loadMemories(true);
  });
  $("#memories-more").addEventListener("click", () => loadMemories(false));
  $("#export").addEventListener("click", exportMemories);
  $("#interactions-newer").addEventListener("click", () => loadInteractions(Math.max(0, view.interactionsOffset - INTERACTION_PAGE)));
  $("#interactions-older").addEventListener("click", () => loadInteractions(view.interactionsOffset + INTERACTION_PAGE));
  start();
});
