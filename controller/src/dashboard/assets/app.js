// Rudder dashboard. Plain JavaScript, no build step. Every string from the cluster goes into
// the page as a text node (never as markup), so names, labels and messages cannot inject.
"use strict";

let csrf = "";
let refreshTimer = null;
let logSource = null;
const MAX_EVENTS = 100;
const MAX_LOG_CHARS = 200000;
const LIVE_AFTER_MS = 1000;

// An element with a class (optional) and children: strings become text nodes.
function el(tag, cls, ...children) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(typeof c === "string" || typeof c === "number" ? String(c) : c);
  }
  return e;
}

function labels(map) {
  const span = el("span");
  for (const [k, v] of Object.entries(map || {})) span.append(el("span", "label", k + "=" + v));
  return span;
}

function showError(msg) {
  const p = document.getElementById("error");
  p.textContent = msg;
  p.classList.toggle("hidden", !msg);
}

async function api(path, options) {
  const resp = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  if (resp.status === 401) {
    window.location.assign("/login");
    throw new Error("not logged in");
  }
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.error || resp.status + " " + resp.statusText);
  return body;
}

function post(path, body) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Rudder-Csrf": csrf },
    body: JSON.stringify(body || {}),
  });
}

async function act(what, f) {
  try {
    await f();
    showError("");
    scheduleRefresh();
  } catch (e) {
    showError(what + ": " + e.message);
  }
}

function renderServices(services) {
  const tbody = document.querySelector("#services tbody");
  tbody.replaceChildren();
  for (const s of services) {
    const actions = el("td");
    if (s.scalable) {
      const input = el("input");
      input.type = "number";
      input.min = "0";
      input.value = String(s.desired);
      input.setAttribute("aria-label", "replicas of " + s.name);
      const scale = el("button", null, "Scale");
      scale.type = "button";
      scale.addEventListener("click", () =>
        act("scale " + s.name, () =>
          post("/api/services/" + encodeURIComponent(s.name) + "/scale", { replicas: Number(input.value) })));
      actions.append(input, scale);
    }
    if (s.can_rollback) {
      const rb = el("button", null, "Roll back");
      rb.type = "button";
      rb.addEventListener("click", () =>
        act("roll back " + s.name, () => post("/api/services/" + encodeURIComponent(s.name) + "/rollback")));
      actions.append(rb);
    }
    const logs = el("button", null, "Logs");
    logs.type = "button";
    logs.addEventListener("click", () => followLogs(s.name));
    actions.append(logs);
    const rollout = s.rollout ? s.rollout + (s.rollout_message ? ": " + s.rollout_message : "") : "";
    tbody.append(el("tr", "service",
      el("td", "name", s.name), el("td", null, s.image), el("td", null, s.mode),
      el("td", "replicas", s.running + "/" + s.desired), el("td", null, rollout),
      el("td", null, labels(s.labels)), actions));
  }
}

function renderNodes(nodes, tasks) {
  const div = document.getElementById("visualizer");
  div.replaceChildren();
  const live = tasks.filter((t) => t.desired_state === "running" || t.state === "running");
  const byNode = new Map();
  for (const t of live) {
    const k = t.node_id || "";
    if (!byNode.has(k)) byNode.set(k, []);
    byNode.get(k).push(t);
  }
  const column = (title, sub, cls, list, node) => {
    const col = el("div", "column " + cls, el("h3", null, title), el("div", "muted", sub));
    if (node) {
      const drain = el("button", null, node.availability === "drain" ? "Activate" : "Drain");
      drain.type = "button";
      const next = node.availability === "drain" ? "active" : "drain";
      drain.addEventListener("click", () =>
        act(next + " " + node.hostname, () =>
          post("/api/nodes/" + encodeURIComponent(node.id) + "/availability", { availability: next })));
      col.append(drain);
    }
    for (const t of list || []) {
      col.append(el("div", "card state-" + t.state,
        el("div", "name", t.name), el("div", "state", t.state),
        t.error || t.message ? el("div", "muted", t.error || t.message) : null));
    }
    return col;
  };
  for (const n of nodes) {
    div.append(column(n.hostname, n.role + " · " + n.state + " · " + n.availability,
      n.state === "down" ? "down" : "", byNode.get(n.id), n));
  }
  const unplaced = byNode.get("");
  if (unplaced && unplaced.length) div.append(column("unassigned", "waiting for a node", "", unplaced, null));
}

function renderTasks(tasks, nodes, omitted) {
  const host = new Map(nodes.map((n) => [n.id, n.hostname]));
  const tbody = document.querySelector("#tasks tbody");
  tbody.replaceChildren();
  for (const t of tasks) {
    tbody.append(el("tr", "task", el("td", null, t.name), el("td", null, host.get(t.node_id) || ""),
      el("td", null, t.desired_state), el("td", "state", t.state), el("td", null, t.message),
      el("td", null, t.error)));
  }
  if (omitted) tbody.append(el("tr", "muted", el("td", null, omitted + " older tasks not shown")));
}

function renderSimple(id, rows) {
  const tbody = document.querySelector("#" + id + " tbody");
  tbody.replaceChildren();
  for (const cells of rows) tbody.append(el("tr", null, ...cells.map((c) => el("td", null, c))));
}

function render(o) {
  renderServices(o.services);
  renderNodes(o.nodes, o.tasks);
  renderTasks(o.tasks, o.nodes, o.tasks_omitted);
  renderSimple("networks", o.networks.map((n) => [n.name, n.driver, n.subnet, n.encrypted ? "yes" : "no"]));
  renderSimple("volumes", o.volumes.map((v) => [v.name, v.driver, labels(v.labels)]));
  renderSimple("secrets", o.secrets.map((s) => [s.kind, s.name, String(s.latest), labels(s.labels)]));
  document.getElementById("status").textContent =
    "raft index " + o.applied + " · " + new Date().toLocaleTimeString();
}

async function refresh() {
  refreshTimer = null;
  try {
    render(await api("/api/state"));
  } catch (e) {
    showError("refresh: " + e.message);
  }
}

function scheduleRefresh() {
  if (refreshTimer === null) refreshTimer = setTimeout(refresh, 250);
}

function followEvents() {
  const list = document.getElementById("events");
  const source = new EventSource("/api/events");
  source.addEventListener("cluster", (m) => {
    const e = JSON.parse(m.data);
    const text = "#" + e.index + " " + e.type + " " + e.action + " " + (e.name || "") +
      (e.node ? " on " + e.node : "") + (e.message ? ": " + e.message : "");
    list.prepend(el("li", null, text));
    while (list.children.length > MAX_EVENTS) list.lastChild.remove();
    scheduleRefresh();
  });
  source.addEventListener("failure", (m) => showError("events: " + m.data));
  // EventSource reconnects by itself; the state may have moved meanwhile.
  source.addEventListener("open", scheduleRefresh);
}

function followLogs(target) {
  if (logSource) logSource.close();
  const pre = document.getElementById("logs");
  pre.textContent = "";
  document.getElementById("logs-target").textContent = target;
  logSource = new EventSource("/api/logs?tail=200&follow=true&target=" + encodeURIComponent(target));
  logSource.addEventListener("log", (m) => {
    const c = JSON.parse(m.data);
    const line = c.warning ? "[" + c.task + "] " + c.warning + "\n" : c.text.replace(/^/gm, c.task + " | ").replace(/ \| $/, "");
    pre.append(document.createTextNode(line));
    if (pre.textContent.length > MAX_LOG_CHARS) pre.textContent = pre.textContent.slice(-MAX_LOG_CHARS / 2);
    pre.scrollTop = pre.scrollHeight;
  });
  logSource.addEventListener("failure", (m) => showError("logs: " + m.data));
}

async function start() {
  try {
    const s = await api("/api/session");
    csrf = s.csrf;
    document.getElementById("who").textContent = s.who + " (" + s.by + ")";
  } catch (e) {
    showError(e.message);
    return;
  }
  document.getElementById("logout").addEventListener("click", () =>
    act("log out", async () => {
      await fetch("/logout", { method: "POST", headers: { "X-Rudder-Csrf": csrf } });
      window.location.assign("/login");
    }));
  await refresh();
  // Live updates start once the first state is on screen (a headless browser taking a
  // screenshot also waits for pending requests, and an event stream never ends).
  setTimeout(followEvents, LIVE_AFTER_MS);
}

document.addEventListener("DOMContentLoaded", start);
