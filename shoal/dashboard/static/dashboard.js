// shoal dashboard: plain JS, no build step, nothing loaded from elsewhere.
// Live data comes from /api/events (server-sent events, one snapshot a second), or from
// polling /api/snapshot with ?transport=poll (used by headless tests). See docs/dashboard.md.
"use strict";

(function () {
  const WINDOW = 20;            // seconds of task stream shown
  const KEEP = 60;              // seconds of task runs kept in the page
  const MAX_RUNS = 20000;
  const STATES = ["released", "waiting", "no-worker", "queued", "processing", "memory", "erred"];
  const params = new URLSearchParams(location.search);
  const transport = params.get("transport") || "events";
  const interval = Math.max(0.2, parseFloat(params.get("interval") || "1"));

  const state = {
    snapshot: null,
    runs: [],                 // [key, group, worker, start, stop, status]
    since: null,              // next task-stream row to ask for
    clockSkew: 0,             // server now - local now (seconds)
    tab: "status",
    tasksOffset: 0,
    lastGraph: 0,
  };

  // ------------------------------------------------------------------ helpers

  const $ = (id) => document.getElementById(id);
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "style") node.style.cssText = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  function bytes(n) {
    if (!n) return "0 B";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
  }
  // A login that ended (expired, logged out elsewhere): back to the login page, then here.
  function toLogin() {
    const here = location.pathname + location.search + location.hash;
    location.href = "/login?next=" + encodeURIComponent(here);
  }
  async function getJSON(url) {
    const response = await fetch(url);
    if (response.status === 401) { toLogin(); throw new Error("not logged in"); }
    return response.json();
  }
  // The logout button shows when this page is open on a session cookie.
  getJSON("api/session").then((s) => { if (s.credential === "cookie") $("logout").hidden = false; })
    .catch(() => {});
  function num(n) { return (n || 0).toLocaleString("en-US"); }
  function seconds(s) {
    if (s === null || s === undefined) return "-";
    if (s === 0) return "0 s";
    if (s < 0.001) return (s * 1e6).toFixed(0) + " µs";
    if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms";
    if (s < 120) return s.toFixed(1) + " s";
    if (s < 7200) return (s / 60).toFixed(0) + " min";
    return (s / 3600).toFixed(1) + " h";
  }
  function when(t) {
    if (!t) return "-";
    const d = new Date(t * 1000);
    return d.toLocaleString();
  }
  function hash(text) {
    let h = 2166136261;
    for (let i = 0; i < text.length; i++) { h ^= text.charCodeAt(i); h = Math.imul(h, 16777619); }
    return h >>> 0;
  }
  const colors = new Map();
  function groupColor(group) {
    let c = colors.get(group);
    if (!c) {
      const h = hash(group);
      c = `hsl(${h % 360}, ${55 + (h >> 9) % 25}%, ${45 + (h >> 17) % 15}%)`;
      colors.set(group, c);
    }
    return c;
  }
  function serverNow() { return Date.now() / 1000 + state.clockSkew; }
  function replace(node, ...children) { node.replaceChildren(...children); }

  // ------------------------------------------------------------------ tabs

  for (const button of document.querySelectorAll("#tabs button")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }
  function showTab(name) {
    state.tab = name;
    for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
    for (const s of document.querySelectorAll(".tab")) s.classList.toggle("active", s.id === "tab-" + name);
    if (name === "logs") loadLogs();
    if (name === "tasks") { loadTasks(); loadGraph(true); }
    if (name === "status") drawStream();
    if (location.hash !== "#" + name) history.replaceState(null, "", location.pathname + location.search + "#" + name);
  }

  // ------------------------------------------------------------------ header

  function renderHeader(info) {
    $("address").textContent = info.address;
    const up = info.now - info.started;
    const items = [
      ["workers", num(info.workers)],
      ["threads", num(info.threads)],
      ["tasks", num(info.tasks)],
      ["memory", bytes(info.memory) + (info.memory_limit ? " / " + bytes(info.memory_limit) : "")],
      ["clients", num(info.clients)],
      ["up", seconds(up)],
    ];
    replace($("summary"), ...items.map(([k, v]) => el("span", {}, k + " ", el("b", {}, v))));
    document.title = `shoal (${info.workers} workers, ${info.tasks} tasks)`;
  }
  function setConnection(ok, text) {
    const c = $("connection");
    c.classList.toggle("live", ok);
    c.classList.toggle("down", !ok);
    $("connection-text").textContent = text;
  }

  // ------------------------------------------------------------------ workers

  function memoryBar(w) {
    const limit = w.memory_limit || 0;
    const frac = limit ? Math.min(1, w.memory / limit) : 0;
    const bar = el("span", { class: "membar", title: limit ? `${bytes(w.memory)} of ${bytes(limit)}` : bytes(w.memory) },
      el("div", { class: frac > 0.95 ? "full" : frac > 0.7 ? "high" : "", style: `width:${(frac * 100).toFixed(1)}%` }));
    return el("span", {}, limit ? bar : null, bytes(w.memory),
      w.spilled_bytes ? el("span", { class: "sub" }, `spilled ${bytes(w.spilled_bytes)}`) : null,
      w.paused ? el("span", { class: "paused" }, "paused") : null);
  }
  function metricsLink(w) {
    return w.dashboard ? el("a", { href: w.dashboard + "metrics", target: "_blank" }, "metrics") : "-";
  }
  function renderWorkers(workers) {
    const body = $("workers-body");
    if (!workers.length) {
      replace(body, el("tr", {}, el("td", { colspan: 11, class: "empty" }, "No workers yet.")));
    } else {
      replace(body, ...workers.map((w) => el("tr", { "data-worker": w.address },
        el("td", {}, w.name, el("span", { class: "sub" }, w.address)),
        el("td", { class: "num" }, w.nthreads),
        el("td", { class: "num" }, w.cpu.toFixed(0) + "%"),
        el("td", {}, memoryBar(w)),
        el("td", { class: "num" }, num(w.executing)),
        el("td", { class: "num" }, num(w.ready)),
        el("td", { class: "num" }, num(w.processing)),
        el("td", { class: "num" }, num(w.in_memory), el("span", { class: "sub" }, bytes(w.nbytes))),
        el("td", { class: "num" }, bytes(w.bytes_in)),
        el("td", { class: "num" }, bytes(w.bytes_out)),
        el("td", {}, metricsLink(w)))));
    }
    $("workers-count").textContent = `${workers.length} workers`;
    replace($("workers-detail"), ...workers.map((w) => el("tr", {},
      el("td", {}, w.name), el("td", { class: "key" }, w.address),
      el("td", { class: "num" }, w.nthreads), el("td", { class: "num" }, w.cpu.toFixed(0) + "%"),
      el("td", { class: "num" }, bytes(w.memory)), el("td", { class: "num" }, w.memory_limit ? bytes(w.memory_limit) : "-"),
      el("td", { class: "num" }, bytes(w.managed_bytes)), el("td", { class: "num" }, bytes(w.spilled_bytes)),
      el("td", { class: "num" }, num(w.executing)), el("td", { class: "num" }, num(w.ready)),
      el("td", { class: "num" }, num(w.processing)), el("td", { class: "num" }, seconds(w.occupancy)),
      el("td", { class: "num" }, num(w.in_memory)), el("td", { class: "num" }, bytes(w.bytes_in)),
      el("td", { class: "num" }, bytes(w.bytes_out)),
      el("td", { class: "num" }, w.last_seen === null ? "-" : seconds(w.last_seen) + " ago"),
      el("td", {}, metricsLink(w)))));
  }

  // ------------------------------------------------------------------ task stream

  function addRuns(stream) {
    state.clockSkew = stream.now - Date.now() / 1000;
    state.since = stream.next;
    for (const row of stream.rows) state.runs.push(row);
    const cutoff = stream.now - KEEP;
    let drop = 0;
    while (drop < state.runs.length && state.runs[drop][4] < cutoff) drop++;
    if (state.runs.length - drop > MAX_RUNS) drop = state.runs.length - MAX_RUNS;
    if (drop) state.runs.splice(0, drop);
  }

  function drawStream() {
    if (state.tab !== "status") return;
    const canvas = $("stream-canvas");
    const workers = (state.snapshot && state.snapshot.workers) || [];
    const now = serverNow();
    const start = now - WINDOW;
    const recent = state.runs.filter((r) => r[4] >= start);
    // Lanes: each worker gets as many rows as it ran tasks at once (greedy packing).
    const byWorker = new Map(workers.map((w) => [w.address, []]));
    for (const r of recent) {
      if (!byWorker.has(r[2])) byWorker.set(r[2], []);
      byWorker.get(r[2]).push(r);
    }
    const lanes = [];  // {worker, label, runs}
    for (const [address, runs] of byWorker) {
      runs.sort((a, b) => a[3] - b[3]);
      const ends = [];
      const rows = [];
      for (const r of runs) {
        let lane = ends.findIndex((end) => end <= r[3]);
        if (lane < 0) { lane = ends.length; ends.push(0); rows.push([]); }
        ends[lane] = r[4];
        rows[lane].push(r);
      }
      if (!rows.length) rows.push([]);
      const w = workers.find((x) => x.address === address);
      rows.forEach((rr, i) => lanes.push({ label: i === 0 ? (w ? w.name : address) : "", runs: rr }));
    }
    const laneHeight = Math.max(8, Math.min(22, Math.floor(200 / Math.max(1, lanes.length))));
    const height = Math.max(60, lanes.length * laneHeight + 4);
    const width = canvas.clientWidth || 900;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    canvas.style.height = height + "px";
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const left = 110;
    const scale = (width - left - 4) / WINDOW;
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    lanes.forEach((lane, i) => {
      const y = 2 + i * laneHeight;
      if (i % 2 === 0) { ctx.fillStyle = "#f1f3f6"; ctx.fillRect(left, y, width - left, laneHeight); }
      if (lane.label) {
        ctx.fillStyle = "#445";
        ctx.fillText(lane.label.length > 16 ? lane.label.slice(0, 15) + "…" : lane.label, 4, y + laneHeight / 2);
      }
      for (const r of lane.runs) {
        const x0 = left + Math.max(0, r[3] - start) * scale;
        const x1 = left + Math.max(0, r[4] - start) * scale;
        ctx.fillStyle = r[5] === "ok" ? groupColor(r[1]) : "#d64545";
        ctx.fillRect(x0, y + 1, Math.max(1, x1 - x0), laneHeight - 2);
      }
    });
    const legendGroups = new Map();
    for (const r of recent) legendGroups.set(r[1], (legendGroups.get(r[1]) || 0) + 1);
    const holder = $("task-stream");
    holder.dataset.runs = String(recent.length);
    $("stream-note").textContent = `${num(recent.length)} task runs in the last ${WINDOW} s`;
    replace($("stream-legend"), ...[...legendGroups.entries()].sort((a, b) => b[1] - a[1]).slice(0, 30)
      .map(([g, n]) => el("span", { "data-group": g }, el("i", { style: `background:${groupColor(g)}` }), `${g} (${num(n)})`)));
    replace($("stream-axis"), ...[WINDOW, (WINDOW * 3) / 4, WINDOW / 2, WINDOW / 4, 0]
      .map((s) => el("span", {}, s === 0 ? "now" : `-${s} s`)));
  }

  // ------------------------------------------------------------------ progress and states

  function renderProgress(tasks) {
    const list = $("progress");
    if (!tasks.groups.length) { replace(list, el("p", { class: "empty" }, "No tasks yet.")); return; }
    const rows = tasks.groups.map((g) => {
      const s = g.states;
      const memory = s.memory || 0, forgotten = s.forgotten || 0, erred = s.erred || 0;
      const processing = s.processing || 0;
      const queued = (s.queued || 0) + (s.waiting || 0) + (s["no-worker"] || 0) + (s.released || 0);
      const total = Math.max(1, g.live + forgotten);
      const pct = (n) => `width:${((100 * n) / total).toFixed(2)}%`;
      const done = memory + forgotten;
      return el("div", { class: "progress-row", "data-group": g.name },
        el("span", { class: "name", title: g.name }, g.name),
        el("div", { class: "bar", title: `memory ${memory}, released ${forgotten}, processing ${processing}, waiting ${queued}, erred ${erred}` },
          el("div", { class: "memory", style: pct(memory) }), el("div", { class: "forgotten", style: pct(forgotten) }),
          el("div", { class: "erred", style: pct(erred) }), el("div", { class: "processing", style: pct(processing) }),
          el("div", { class: "queued", style: pct(queued) })),
        el("span", { class: "count" }, `${num(done)} / ${num(g.live + forgotten)}` + (erred ? ` (${num(erred)} erred)` : "") +
          (g.duration ? ` · ${seconds(g.duration)}` : "")));
    });
    if (tasks.groups_total > tasks.groups.length) {
      rows.push(el("p", { class: "empty" }, `… and ${num(tasks.groups_total - tasks.groups.length)} more groups`));
    }
    replace(list, ...rows);
  }

  function renderStates(tasks) {
    replace($("states"), el("span", { class: "state" }, "all", el("b", {}, num(tasks.total))),
      ...STATES.filter((s) => tasks.by_state[s]).map((s) =>
        el("span", { class: `state state-${s}`, "data-state": s }, s, el("b", {}, num(tasks.by_state[s])))));
    $("transitions").textContent = `${num(tasks.transitions)} transitions`;
  }

  // ------------------------------------------------------------------ graph

  const stateColor = { memory: "#2e9e5b", processing: "#3b82c4", erred: "#d64545", queued: "#aab2bd",
    waiting: "#c9ced5", "no-worker": "#e0a030", released: "#e4e7eb" };

  async function loadGraph(force) {
    const total = state.snapshot ? state.snapshot.tasks.total : 0;
    const now = Date.now();
    if (!force && now - state.lastGraph < 3000) return;
    state.lastGraph = now;
    const targets = [$("graph-small"), $("graph-big")];
    if (total > 500) {
      for (const t of targets) replace(t, el("p", { class: "empty" }, `${num(total)} tasks: the graph is drawn for 500 or fewer; see the counts.`));
      $("graph-note").textContent = `${num(total)} tasks`;
      return;
    }
    try {
      const g = await getJSON("api/graph");
      $("graph-note").textContent = `${num(g.count)} tasks`;
      for (const t of targets) drawGraph(t, g);
    } catch (e) { /* next time */ }
  }

  function drawGraph(target, g) {
    if (!g.nodes.length) { replace(target, el("p", { class: "empty" }, "No tasks.")); return; }
    const n = g.nodes.length;
    const deps = Array.from({ length: n }, () => []);
    for (const [a, b] of g.edges) deps[b].push(a);
    const depth = new Array(n).fill(-1);
    const visit = (i, guard) => {
      if (depth[i] >= 0) return depth[i];
      if (guard > n) return 0;
      let d = 0;
      for (const j of deps[i]) d = Math.max(d, visit(j, guard + 1) + 1);
      depth[i] = d;
      return d;
    };
    for (let i = 0; i < n; i++) visit(i, 0);
    const levels = [];
    for (let i = 0; i < n; i++) (levels[depth[i]] = levels[depth[i]] || []).push(i);
    const big = target.classList.contains("big");
    const r = big ? 5 : 3.5;
    const gapX = big ? 70 : 40, gapY = big ? 14 : 9;
    // A wide level (many tasks at one depth) wraps into several columns.
    const maxRows = big ? 34 : 24;
    const columns = [];
    for (const level of levels.filter(Boolean)) {
      for (let k = 0; k < level.length; k += maxRows) columns.push(level.slice(k, k + maxRows));
    }
    const tallest = Math.max(...columns.map((c) => c.length));
    const width = Math.max(200, columns.length * gapX + 20);
    const height = Math.max(60, tallest * gapY + 20);
    const pos = new Array(n);
    columns.forEach((col, x) => col.forEach((i, y) => { pos[i] = [15 + x * gapX, 10 + y * gapY + (tallest - col.length) * gapY / 2]; }));
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", width); svg.setAttribute("height", height);
    for (const [a, b] of g.edges) {
      const line = document.createElementNS(ns, "line");
      line.setAttribute("x1", pos[a][0]); line.setAttribute("y1", pos[a][1]);
      line.setAttribute("x2", pos[b][0]); line.setAttribute("y2", pos[b][1]);
      line.setAttribute("stroke", "#c5ccd5"); line.setAttribute("stroke-width", "0.8");
      svg.append(line);
    }
    g.nodes.forEach((node, i) => {
      const c = document.createElementNS(ns, "circle");
      c.setAttribute("cx", pos[i][0]); c.setAttribute("cy", pos[i][1]); c.setAttribute("r", r);
      c.setAttribute("fill", stateColor[node.state] || "#999");
      c.setAttribute("stroke", groupColor(node.group)); c.setAttribute("stroke-width", "1.5");
      const title = document.createElementNS(ns, "title");
      title.textContent = `${node.key} (${node.state})`;
      c.append(title);
      c.addEventListener("click", () => { showTab("tasks"); loadStory(node.key); });
      svg.append(c);
    });
    replace(target, svg);
  }

  // ------------------------------------------------------------------ jobs

  function renderJobs(jobs) {
    const holder = $("jobs");
    if (!jobs || !jobs.attached) {
      $("jobs-url").textContent = "";
      replace(holder, el("div", { class: "notice" },
        "No job queue is attached. Start the scheduler with ",
        el("code", {}, "shoal scheduler --jobs-url sqlite:///jobs.db"),
        " (or ", el("code", {}, "--jobs-url myapp:app"), " to see its schedules too), or call ",
        el("code", {}, "scheduler.attach_jobs(app)"), "."));
      replace($("schedules"), el("p", { class: "empty" }, "No schedules."));
      return;
    }
    $("jobs-url").textContent = jobs.url + (jobs.stale ? " (refreshing…)" : "");
    const statuses = jobs.statuses;
    const queues = Object.entries(jobs.queues);
    const parts = [];
    if (jobs.error) parts.push(el("p", { class: "error-text" }, jobs.error));
    if (!queues.length) parts.push(el("p", { class: "empty" }, "The queue holds no jobs."));
    else parts.push(el("div", { class: "table-wrap" }, el("table", {},
      el("thead", {}, el("tr", {}, el("th", {}, "queue"), ...statuses.map((s) => el("th", { class: "num" }, s)))),
      el("tbody", {}, ...queues.map(([q, per]) => el("tr", { "data-queue": q }, el("td", {}, q),
        ...statuses.map((s) => el("td", { class: "num" + (s === "dead" && per[s] ? " error" : "") }, num(per[s])))))))));
    replace(holder, ...parts);
    if (!jobs.schedules.length) {
      replace($("schedules"), el("p", { class: "empty" }, "No schedules (attach the app, MODULE:APP, to see them)."));
    } else {
      replace($("schedules"), el("div", { class: "table-wrap" }, el("table", {},
        el("thead", {}, el("tr", {}, ...["name", "job", "when", "time zone", "last fired", "next firing"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...jobs.schedules.map((s) => el("tr", {},
          el("td", {}, s.name), el("td", {}, s.job),
          el("td", {}, s.cron ? s.cron : `every ${seconds(s.every)}`), el("td", {}, s.tz),
          el("td", {}, when(s.last)), el("td", {}, when(s.next))))))));
    }
  }

  // ------------------------------------------------------------------ tasks tab

  for (const s of STATES) $("tasks-state").append(el("option", { value: s }, s));
  $("tasks-form").addEventListener("submit", (e) => { e.preventDefault(); state.tasksOffset = 0; loadTasks(); });
  $("tasks-prev").addEventListener("click", () => { state.tasksOffset = Math.max(0, state.tasksOffset - 50); loadTasks(); });
  $("tasks-next").addEventListener("click", () => { state.tasksOffset += 50; loadTasks(); });

  async function loadTasks() {
    const q = new URLSearchParams({ offset: state.tasksOffset, limit: 50 });
    if ($("tasks-state").value) q.set("state", $("tasks-state").value);
    if ($("tasks-group").value.trim()) q.set("group", $("tasks-group").value.trim());
    try {
      const page = await getJSON("api/tasks?" + q);
      $("tasks-note").textContent = `${num(page.total)} tasks; showing ${num(page.offset + 1)}–${num(page.offset + page.tasks.length)}`;
      replace($("tasks-body"), ...page.tasks.map((t) => el("tr", {},
        el("td", { class: "key" }, el("a", { onclick: () => loadStory(t.key), title: t.key }, t.key)),
        el("td", {}, t.group), el("td", {}, t.state),
        el("td", { class: "key" }, t.worker || t.who_has.join(", ")),
        el("td", { class: "num" }, bytes(t.nbytes)), el("td", {}, t.type),
        el("td", { class: "num" }, `${t.dependencies} / ${t.dependents}`),
        el("td", { class: "error", title: t.error || "" }, t.error || ""))));
    } catch (e) { $("tasks-note").textContent = "could not load tasks"; }
  }

  $("story-form").addEventListener("submit", (e) => { e.preventDefault(); loadStory($("story-key").value.trim()); });
  async function loadStory(key) {
    if (!key) return;
    $("story-key").value = key;
    const target = $("story");
    try {
      const story = await getJSON("api/story/" + encodeURIComponent(key));
      const parts = [el("p", {}, story.known ? `now ${story.task.state}` + (story.task.error ? `: ${story.task.error}` : "") : "not held by the scheduler now")];
      if (story.transitions.length) {
        parts.push(el("table", {}, el("thead", {}, el("tr", {}, ...["time", "from", "to", "stimulus"].map((h) => el("th", {}, h)))),
          el("tbody", {}, ...story.transitions.map((t) => el("tr", {},
            el("td", {}, new Date(t.time * 1000).toLocaleTimeString()), el("td", {}, t.start), el("td", {}, t.finish),
            el("td", { class: "key" }, t.stimulus))))));
      } else parts.push(el("p", { class: "empty" }, "No transitions logged."));
      if (story.runs.length) {
        parts.push(el("table", {}, el("thead", {}, el("tr", {}, ...["worker", "ran", "status"].map((h) => el("th", {}, h)))),
          el("tbody", {}, ...story.runs.map((r) => el("tr", {}, el("td", { class: "key" }, r.worker),
            el("td", {}, seconds(r.stop - r.start)), el("td", {}, r.status))))));
      }
      replace(target, ...parts);
    } catch (e) { replace(target, el("p", { class: "error-text" }, "could not load the story")); }
  }

  // ------------------------------------------------------------------ logs

  $("logs-refresh").addEventListener("click", loadLogs);
  async function loadLogs() {
    try {
      const logs = await getJSON("api/logs?n=500");
      if (!logs.rows.length) { replace($("logs"), "No log records (the shoal logger's level may be above them: set SHOAL_LOG_LEVEL=info)."); return; }
      replace($("logs"), ...logs.rows.map(([t, level, name, msg]) =>
        el("div", { class: level }, `${new Date(t * 1000).toLocaleTimeString()} ${level.padEnd(7)} ${name}: ${msg}`)));
    } catch (e) { replace($("logs"), "could not load the logs"); }
  }

  // ------------------------------------------------------------------ updates

  function apply(snapshot) {
    state.snapshot = snapshot;
    addRuns(snapshot.stream);
    renderHeader(snapshot.info);
    renderWorkers(snapshot.workers);
    renderProgress(snapshot.tasks);
    renderStates(snapshot.tasks);
    renderJobs(snapshot.jobs);
    drawStream();
    if (state.tab === "status" || state.tab === "tasks") loadGraph(false);
    document.body.dataset.updated = String(Date.now());
  }

  async function poll() {
    try {
      const q = state.since === null ? "" : "?since=" + state.since;
      const snapshot = await getJSON("api/snapshot" + q);
      apply(snapshot);
      setConnection(true, "live (polling)");
    } catch (e) {
      setConnection(false, "reconnecting");
    }
    setTimeout(poll, interval * 1000);
  }

  function listen() {
    const source = new EventSource(`api/events?interval=${interval}`);
    source.onopen = () => { state.runs = []; };  // a new stream starts with the last minute's runs
    source.onmessage = (e) => { apply(JSON.parse(e.data)); setConnection(true, "live"); };
    source.onerror = () => {
      setConnection(false, "reconnecting");
      getJSON("api/session").catch(() => {});  // an event stream cannot tell a 401 apart
    };
  }

  window.addEventListener("resize", drawStream);
  setInterval(drawStream, 1000);  // keep the stream sliding between updates
  const initial = (location.hash || "#status").slice(1);
  if (["status", "workers", "tasks", "jobs", "logs"].includes(initial)) showTab(initial);
  if (transport === "poll" || typeof EventSource === "undefined") poll();
  else listen();
})();
