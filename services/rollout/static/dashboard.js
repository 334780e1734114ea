// The rollout service's live dashboard (services/rollout/dashboard.py says what it reads).
// Untrusted text (problems, hints, completions, answers, engine notes) enters the page only
// as text nodes: `el` never parses markup, and nothing here sets innerHTML.
"use strict";

const POLL_MS = 3000;
const HISTORY = 1000; // trainer steps charted (the API's most)
const RECENT = 50; // steps asked for on each poll after the first
const SLOW_EVERY = 4; // polls between reads of the problems table and the evaluations
const MAX_ROWS = 500; // problems-table rows drawn (the filters narrow the rest)
const ROLLOUTS_PAGE = 25;
const TOKEN_KEY = "pope-rl-token";
const SVG = "http://www.w3.org/2000/svg";
const COLORS = { hinted: "#d9480f", unhinted: "#1c7ed6" };
const PALETTE = ["#1c7ed6", "#d9480f", "#2f9e44", "#ae3ec9", "#f59f00", "#0c8599", "#e03131", "#5c7cfa"];

// ---- elements -------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  append(node, children);
  return node;
}

const $ = (id) => document.getElementById(id);

function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return x.toLocaleString("en-US");
  const a = Math.abs(x);
  if (a >= 1000) return x.toLocaleString("en-US", { maximumFractionDigits: 0 });
  if (a >= 1) return x.toFixed(2);
  return x.toPrecision(digits);
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 90) return `${Math.round(s)}s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

// ---- the API, with the token when reads need it ---------------------------------------

let asking = null; // the token prompt, while it is open: every caller waits on the same one

function askToken(message) {
  if (asking) return asking;
  const dialog = $("token-dialog");
  const note = $("token-error");
  note.hidden = !message;
  note.textContent = message || "";
  asking = new Promise((resolve) => {
    const form = $("token-form");
    const take = (ev) => {
      const token = $("token-input").value.trim();
      $("token-input").value = "";
      if (!/^[\x21-\x7e]+$/.test(token)) {
        ev.preventDefault(); // keep the dialog open: a header can carry printable ASCII only
        note.hidden = false;
        note.textContent = "A token is printable ASCII without spaces; try again.";
        return;
      }
      form.removeEventListener("submit", take);
      sessionStorage.setItem(TOKEN_KEY, token);
      asking = null;
      resolve(token);
    };
    form.addEventListener("submit", take);
  });
  if (!dialog.open) dialog.showModal();
  return asking;
}

// Whether the API's reads need the token, from its own description (open to all): so the
// page asks before its first read, rather than after a refusal.
async function readsNeedToken() {
  try {
    const resp = await fetch("/openapi.json", { cache: "no-store" });
    const spec = await resp.json();
    const op = spec.paths && spec.paths["/v1/status"] && spec.paths["/v1/status"].get;
    return Boolean(op && op.security && op.security.length);
  } catch (_) {
    return false; // the first read's 401, if any, asks instead
  }
}

async function api(path) {
  for (let tries = 0; tries < 5; tries++) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    const resp = await fetch(path, { headers, cache: "no-store" });
    if (resp.status === 401) {
      await askToken(token ? "That token was refused; try again." : "");
      continue;
    }
    if (!resp.ok) {
      let why = `${resp.status} ${resp.statusText}`;
      try {
        const body = await resp.json();
        if (body && body.detail) why += `: ${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)}`;
      } catch (_) {
        /* not JSON */
      }
      throw new Error(`${path}: ${why}`);
    }
    return resp.json();
  }
  throw new Error(`${path}: no token accepted`);
}

function showError(err) {
  const box = $("error");
  box.hidden = !err;
  box.textContent = err ? String(err.message || err) : "";
}

// ---- charts: SVG, drawn here ----------------------------------------------------------

const W = 420;
const H = 210;
const PAD = { left: 46, right: 10, top: 8, bottom: 26 };

function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(+t.toPrecision(12));
  return out;
}

function extent(values, fixed) {
  let lo = fixed && fixed[0] !== undefined ? fixed[0] : Math.min(...values);
  let hi = fixed && fixed[1] !== undefined ? fixed[1] : Math.max(...values);
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [0, 1];
  if (hi === lo) {
    hi = lo + (Math.abs(lo) || 1) * 0.5;
    lo = fixed && fixed[0] !== undefined ? lo : lo - (hi - lo);
  }
  return [lo, hi];
}

// series: [{name, color, points: [[x, y], ...]}]; opts: {y: [lo, hi], x: label}
function lineChart(figure, series, opts = {}) {
  const points = series.flatMap((s) => s.points);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  const pw = W - PAD.left - PAD.right;
  const ph = H - PAD.top - PAD.bottom;
  if (!points.length) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, opts.empty || "no data yet"));
  } else {
    const [x0, x1] = extent(points.map((p) => p[0]));
    const [y0, y1] = extent(points.map((p) => p[1]), opts.y);
    const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * pw;
    const sy = (y) => PAD.top + ph - ((y - y0) / (y1 - y0)) * ph;
    const whole = points.every((p) => Number.isInteger(p[0])); // steps and versions: whole ticks only
    const xticks = niceTicks(x0, x1).filter((t) => !whole || Number.isInteger(t));
    drawAxes(root, xticks, niceTicks(y0, y1), sx, sy, x0, x1, y0, y1);
    for (const s of series) {
      if (!s.points.length) continue;
      const d = s.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
      root.append(svg("path", { d, stroke: s.color, class: "series", "data-series": s.name }));
      const dots = svg("g", { fill: s.color, class: "points", "data-series": s.name });
      const r = s.points.length > 120 ? 1.2 : 2.4;
      for (const [x, y] of s.points) {
        dots.append(svg("circle", { cx: sx(x).toFixed(1), cy: sy(y).toFixed(1), r }, svg("title", {}, `${s.name} @ ${fmt(x)}: ${fmt(y)}`)));
      }
      root.append(dots);
    }
  }
  draw(figure, root, series, points.length);
}

// bars: [{x, parts: {name: value}}], stacked in the order of `names`
function stackedBars(figure, bars, names) {
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  const pw = W - PAD.left - PAD.right;
  const ph = H - PAD.top - PAD.bottom;
  const colors = Object.fromEntries(names.map((n, i) => [n, PALETTE[i % PALETTE.length]]));
  const series = names.map((name) => ({ name, color: colors[name], points: [] }));
  let count = 0;
  if (!bars.length) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no data yet"));
  } else {
    const totals = bars.map((b) => names.reduce((t, n) => t + (b.parts[n] || 0), 0));
    const [y0, y1] = extent(totals, [0]);
    const xs = bars.map((b) => b.x);
    const [x0, x1] = [Math.min(...xs) - 0.5, Math.max(...xs) + 0.5];
    const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * pw;
    const sy = (y) => PAD.top + ph - ((y - y0) / (y1 - y0)) * ph;
    drawAxes(root, niceTicks(Math.min(...xs), Math.max(...xs)).filter(Number.isInteger), niceTicks(y0, y1), sx, sy, x0, x1, y0, y1);
    const width = Math.max(1, (pw / bars.length) * 0.8);
    for (const b of bars) {
      let base = 0;
      for (const name of names) {
        const v = b.parts[name] || 0;
        if (v <= 0) continue;
        const rect = svg("rect", {
          x: (sx(b.x) - width / 2).toFixed(1),
          y: sy(base + v).toFixed(1),
          width: width.toFixed(1),
          height: Math.max(0, sy(base) - sy(base + v)).toFixed(1),
          fill: colors[name],
          class: "bar",
        });
        rect.append(svg("title", {}, `step ${b.x}: ${name} ${fmt(v)} s`));
        root.append(rect);
        base += v;
        count++;
      }
    }
  }
  draw(figure, root, series, count);
}

function drawAxes(root, xticks, yticks, sx, sy, x0, x1, y0, y1) {
  for (const t of yticks) {
    root.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: sy(t), y2: sy(t), class: "grid" }));
    root.append(svg("text", { x: PAD.left - 4, y: sy(t) + 3, "text-anchor": "end", class: "tick" }, fmt(t)));
  }
  for (const t of xticks) {
    if (t < x0 || t > x1) continue;
    root.append(svg("text", { x: sx(t), y: H - PAD.bottom + 14, "text-anchor": "middle", class: "tick" }, fmt(t)));
  }
  root.append(svg("line", { x1: PAD.left, x2: PAD.left, y1: sy(y1), y2: sy(y0), class: "axis" }));
  root.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: sy(y0), y2: sy(y0), class: "axis" }));
}

function draw(figure, root, series, count) {
  const caption = figure.querySelector("figcaption");
  figure.replaceChildren(caption, root);
  const legend = el("div", { class: "legend" });
  for (const s of series) {
    legend.append(el("span", {}, el("span", { class: "swatch", dataset: { color: s.color } }), s.name));
  }
  for (const swatch of legend.querySelectorAll(".swatch")) swatch.style.background = swatch.dataset.color;
  figure.append(legend);
  figure.dataset.points = String(count);
}

// ---- what the trainer's history says --------------------------------------------------

const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);

function byStep(history, key) {
  return history.filter((h) => num(h[key]) !== null).map((h) => [h.step, h[key]]);
}

function variantSeries(history, metric) {
  return ["hinted", "unhinted"].map((v) => ({ name: v, color: COLORS[v], points: byStep(history, `${v}/${metric}`) }));
}

function staleness(history) {
  const mean = [];
  const max = [];
  for (const h of history) {
    let n = 0;
    let sum = 0;
    let top = null;
    for (const [k, v] of Object.entries(h)) {
      if (!k.startsWith("staleness/") || !num(v)) continue;
      const lag = Number(k.slice("staleness/".length));
      n += v;
      sum += lag * v;
      top = top === null ? lag : Math.max(top, lag);
    }
    if (n > 0) {
      mean.push([h.step, sum / n]);
      max.push([h.step, top]);
    }
  }
  return [
    { name: "mean", color: PALETTE[0], points: mean },
    { name: "max", color: PALETTE[1], points: max },
  ];
}

function renderTraining(history) {
  const steps = [...history].sort((a, b) => a.step - b.step); // the API's is newest first
  lineChart($("chart-reward"), variantSeries(steps, "reward_mean"), { y: [0] });
  lineChart($("chart-solved"), variantSeries(steps, "solve_rate"), { y: [0, 1] });
  lineChart($("chart-zero-variance"), variantSeries(steps, "zero_variance_frac"), { y: [0, 1] });
  lineChart($("chart-throughput"), [{ name: "tokens/s", color: PALETTE[2], points: byStep(steps, "tokens_per_s") }], { y: [0] });
  const perMin = steps
    .filter((h) => num(h.groups) !== null && num(h.step_seconds) > 0)
    .map((h) => [h.step, (h.groups / h.step_seconds) * 60]);
  lineChart($("chart-groups"), [{ name: "groups/min", color: PALETTE[3], points: perMin }], { y: [0] });
  lineChart($("chart-staleness"), staleness(steps), { y: [0] });
  const parts = [...new Set(steps.flatMap((h) => Object.keys(h).filter((k) => /^time_.*_s$/.test(k))))];
  const recent = steps.slice(-80).map((h) => ({ x: h.step, parts: Object.fromEntries(parts.map((p) => [p, num(h[p]) || 0])) }));
  stackedBars($("chart-step-time"), recent, parts);
}

function renderEvaluations(body) {
  const rows = [...body.evaluations].sort((a, b) => a.weight_version - b.weight_version);
  const k = body.k;
  const series = [];
  for (const v of ["unhinted", "hinted"]) {
    for (const stat of k === 1 ? ["pass@1"] : [`pass@${k}`, "pass@1"]) {
      const points = rows.filter((r) => num(r[`${v}/${stat}`]) !== null).map((r) => [r.weight_version, r[`${v}/${stat}`]]);
      const color = stat === "pass@1" ? shade(COLORS[v]) : COLORS[v];
      series.push({ name: `${v} ${stat}`, color, points });
    }
  }
  const empty = body.every_steps ? "no evaluation yet" : "no periodic evaluation (rollout.evaluation.every_steps is 0)";
  lineChart($("chart-eval"), series, { y: [0, 1], empty });
}

function shade(hex) {
  const n = parseInt(hex.slice(1), 16);
  const mix = (c) => Math.round(c + (255 - c) * 0.5);
  return `rgb(${mix(n >> 16)}, ${mix((n >> 8) & 255)}, ${mix(n & 255)})`;
}

function renderOverview(status) {
  const t = status.trainer || {};
  const r = status.rollout || {};
  const scored = (status.streams || {}).scored || {};
  const lag = scored.trainers && typeof scored.trainers === "object" ? scored.trainers.lag : null;
  const steps = t.max_steps ? `${fmt(t.version)} / ${fmt(t.max_steps)}` : fmt(t.version);
  const items = [
    ["trainer step", steps],
    ["engine weights", fmt(status.engine && status.engine.weight_version)],
    ["buffered groups", fmt(t.buffered)],
    ["scheduler step", fmt(r.step)],
    ["groups/min", fmt(r.groups_per_min)],
    ["scored lag", fmt(lag)],
    ["problems", fmt(status.problems)],
    ["scheduler waits for", r.waiting_for || "–"],
  ];
  $("overview").replaceChildren(...items.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v))));
  $("overview").dataset.step = String(t.version ?? "");
}

function renderEngines(engine) {
  const records = (engine && engine.engines) || [];
  const rows = records.map((e) =>
    el(
      "tr",
      { dataset: { url: e.url } },
      el("td", { class: "problem-id" }, e.url),
      el("td", {}, e.state),
      el("td", {}, e.weight_version ?? "–"),
      el("td", {}, e.routed ? "yes" : "no"),
      el("td", {}, ago(e.checked_at ? Date.parse(e.checked_at) / 1000 : null)),
      el("td", {}, e.error || (e.failures ? `${e.failures} failed checks` : "")),
    ),
  );
  if (!rows.length) {
    const where = engine && engine.url ? ` (generation goes to ${engine.url})` : "";
    rows.push(el("tr", {}, el("td", { colspan: 6, class: "muted" }, `no engine in the registry yet${where}`)));
  }
  $("engines-table").tBodies[0].replaceChildren(...rows);
}

// ---- the problems table ---------------------------------------------------------------

const problems = { rows: [], sort: { key: "id", dir: 1 } };

function problemKey(row, key) {
  switch (key) {
    case "hinted_attempts": return row.hinted.attempts;
    case "hinted_solves": return row.hinted.solves;
    case "unhinted_attempts": return row.unhinted.attempts;
    case "unhinted_solves": return row.unhinted.solves;
    case "hinted_first": return row.hinted.first_solve_step;
    case "unhinted_first": return row.unhinted.first_solve_step;
    default: return row[key];
  }
}

function compare(a, b) {
  if (a === b) return 0;
  if (a === null || a === undefined) return 1; // empty last, whichever the direction
  if (b === null || b === undefined) return -1;
  return typeof a === "number" && typeof b === "number" ? a - b : String(a).localeCompare(String(b));
}

async function loadProblems() {
  const rows = [];
  let offset = 0;
  while (offset !== null && offset !== undefined) {
    const page = await api(`/v1/transfer?offset=${offset}`);
    rows.push(...page.rows);
    offset = page.next_offset;
  }
  problems.rows = rows;
  renderProblems();
}

function renderProblems() {
  const text = $("problems-filter").value.trim().toLowerCase();
  const label = $("problems-label").value;
  const split = $("problems-split").value;
  const transferred = $("problems-transferred").checked;
  const { key, dir } = problems.sort;
  const shown = problems.rows
    .filter((r) => !text || [r.id, r.prompt, r.label || ""].some((s) => s.toLowerCase().includes(text)))
    .filter((r) => !label || (label === "none" ? r.label === null : r.label === label))
    .filter((r) => !split || r.split === split)
    .filter((r) => !transferred || r.unhinted.first_solve_step !== null)
    .sort((a, b) => {
      const ka = problemKey(a, key);
      const kb = problemKey(b, key);
      if (ka === null || ka === undefined || kb === null || kb === undefined) return compare(ka, kb);
      return dir * compare(ka, kb);
    });
  const body = shown.slice(0, MAX_ROWS).map((r) =>
    el(
      "tr",
      { dataset: { id: r.id }, title: r.prompt, onclick: () => inspectProblem(r.id) },
      el("td", { class: "problem-id" }, r.id),
      el("td", { class: "problem-text" }, r.prompt.length > 70 ? `${r.prompt.slice(0, 70)}…` : r.prompt),
      el("td", {}, r.label || "–"),
      el("td", {}, r.split),
      el("td", { class: "num" }, r.hint_fraction === null ? "–" : `${(r.hint_fraction * 100).toFixed(0)}%`),
      el("td", { class: "num" }, fmt(r.hinted.attempts)),
      el("td", { class: "num" }, fmt(r.hinted.solves)),
      el("td", { class: "num" }, fmt(r.unhinted.attempts)),
      el("td", { class: "num" }, fmt(r.unhinted.solves)),
      el("td", { class: "num" }, fmt(r.hinted.first_solve_step)),
      el("td", { class: "num" }, fmt(r.unhinted.first_solve_step)),
    ),
  );
  $("problems-table").tBodies[0].replaceChildren(...body);
  const drawn = shown.length > MAX_ROWS ? `, the first ${MAX_ROWS} shown` : "";
  $("problems-count").textContent = `${shown.length} of ${problems.rows.length}${drawn}`;
  for (const th of $("problems-table").tHead.rows[0].cells) {
    if (th.dataset.key === key) th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
    else th.removeAttribute("aria-sort");
  }
}

function sortProblems(key) {
  const s = problems.sort;
  problems.sort = { key, dir: s.key === key ? -s.dir : 1 };
  renderProblems();
}

function inspectProblem(id) {
  $("f-problem").value = id;
  takeFilters();
  loadRollouts().catch(showError);
  $("inspector-form").scrollIntoView({ behavior: "smooth" });
}

// ---- the rollout inspector ------------------------------------------------------------

// filters: what "apply" took from the form (a half-typed field is not a query); asked: a
// count of the pages asked for, so that a late answer to an earlier ask is dropped.
const inspector = { pages: [null], next: null, rows: [], selected: null, filters: {}, asked: 0 };
const FILTERS = { problem_id: "f-problem", variant: "f-variant", step: "f-step", min_reward: "f-min-reward", max_reward: "f-max-reward" };

function takeFilters() {
  inspector.filters = {};
  for (const [name, id] of Object.entries(FILTERS)) {
    const v = $(id).value.trim();
    if (v) inspector.filters[name] = v;
  }
  inspector.pages = [null];
}

// The newest page follows the run unless it is filtered by more than the variant: a rare
// filter can read far back through the archive, so it is read when applied, not each poll.
function following() {
  return inspector.pages.length === 1 && Object.keys(inspector.filters).every((k) => k === "variant");
}

function rolloutQuery(cursor) {
  const q = new URLSearchParams({ limit: String(ROLLOUTS_PAGE), ...inspector.filters });
  if (cursor) q.set("cursor", cursor);
  return `/v1/rollouts?${q}`;
}

async function loadRollouts() {
  const ask = ++inspector.asked;
  const cursor = inspector.pages[inspector.pages.length - 1];
  const page = await api(rolloutQuery(cursor));
  if (ask !== inspector.asked) return; // a later ask went out meanwhile: its answer counts
  inspector.rows = page.rollouts;
  inspector.next = page.next_cursor;
  renderRollouts();
}

function rolloutKey(r) {
  return `${r.group_id}/${r.sample_index}`;
}

function renderRollouts() {
  const rows = inspector.rows.map((r) =>
    el(
      "tr",
      { class: inspector.selected === rolloutKey(r) ? "selected" : null, dataset: { key: rolloutKey(r), variant: r.variant }, onclick: () => showRollout(r) },
      el("td", { class: "num" }, r.step),
      el("td", { class: "problem-id" }, r.problem_id),
      el("td", { class: `variant-${r.variant}` }, r.variant),
      el("td", { class: "num" }, fmt(r.reward)),
      el("td", {}, r.extracted ?? "–"),
      el("td", { class: "num" }, r.weight_version),
      el("td", { class: "num" }, r.completion_tokens),
    ),
  );
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "no rollout matches")));
  $("rollouts-table").tBodies[0].replaceChildren(...rows);
  $("page-number").textContent = `page ${inspector.pages.length}${following() ? " (live)" : ""}`;
  $("page-newer").disabled = inspector.pages.length === 1;
  $("page-older").disabled = !inspector.next;
}

// The prompt as text, its hint wrapped in <mark class="hint">: the last occurrence, since
// the template ends the hinted prompt with it (a short hint may also occur in the problem).
function markedPrompt(prompt, hint) {
  const pre = el("pre", { class: "prompt" });
  const at = hint ? prompt.lastIndexOf(hint) : -1;
  if (at < 0) return append(pre, [prompt]);
  return append(pre, [prompt.slice(0, at), el("mark", { class: "hint" }, hint), prompt.slice(at + hint.length)]);
}

function showRollout(r) {
  inspector.selected = rolloutKey(r);
  renderRollouts();
  const facts = [
    ["problem", r.problem_id],
    ["variant", r.variant],
    ["reward", fmt(r.reward)],
    ["extracted answer", r.extracted ?? "none"],
    ["weight version", r.weight_version],
    ["step", r.step],
    ["finish", r.finish_reason],
    ["completion tokens", r.completion_tokens],
    ["scored", r.scored_at],
    ["scoring", r.policy],
    ["group", `${r.group_id} #${r.sample_index}`],
  ];
  if (r.timed_out) facts.push(["verifier", "timed out"]);
  if (r.error) facts.push(["verifier error", r.error]);
  $("rollout-detail").replaceChildren(
    el("dl", {}, facts.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
    el("h3", {}, r.hint ? "Prompt (the hint is marked)" : "Prompt"),
    markedPrompt(r.prompt, r.hint),
    el("h3", {}, "Completion"),
    el("pre", { class: "completion" }, r.text),
  );
}

// ---- the loop -------------------------------------------------------------------------

let tick = 0;

// The trainer's steps by step number: all of them once, then only the newest few each poll
// (a step seen again replaces the one held: a resumed trainer redoes steps).
const steps = new Map();

async function readStatus() {
  const recent = steps.size ? RECENT : HISTORY;
  const status = await api(`/v1/status?history=${recent}`);
  const newest = Math.max(-1, ...steps.keys());
  const rows = status.history;
  if (steps.size && rows.length === recent && rows[rows.length - 1].step > newest + 1) {
    return api(`/v1/status?history=${HISTORY}`).then((full) => merge(full, true)); // fell behind
  }
  return merge(status, false);
}

// The history is newest first, and a resumed trainer pushes the steps it redoes again while
// the abandoned rows stay behind them: the first row of a step in it is the one that counts,
// and a step above the trainer's version belongs to a run it rewound.
function merge(status, whole) {
  if (whole) steps.clear();
  const seen = new Set();
  for (const row of status.history) {
    if (seen.has(row.step)) continue;
    seen.add(row.step);
    steps.set(row.step, row);
  }
  const version = status.trainer && status.trainer.version;
  if (typeof version === "number") for (const step of steps.keys()) if (step > version) steps.delete(step);
  const keep = new Set([...steps.keys()].sort((a, b) => a - b).slice(-HISTORY));
  for (const step of steps.keys()) if (!keep.has(step)) steps.delete(step);
  return status;
}

async function refresh() {
  const slow = tick++ % SLOW_EVERY === 0; // the problems table and evaluations every few polls
  const status = await readStatus();
  renderOverview(status);
  renderTraining([...steps.values()]);
  renderEngines(status.engine);
  if (slow) {
    renderEvaluations(await api("/v1/evaluations?limit=1000"));
    await loadProblems();
  }
  if (following()) await loadRollouts();
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  document.body.dataset.refreshes = String(tick);
}

async function loop() {
  if ($("live").checked || tick === 0) {
    try {
      await refresh();
      showError(null);
    } catch (err) {
      showError(err);
    }
  }
  setTimeout(loop, POLL_MS);
}

async function start() {
  if (!sessionStorage.getItem(TOKEN_KEY) && (await readsNeedToken())) await askToken("");
  loop();
}

function wire() {
  $("token-dialog").addEventListener("cancel", (ev) => ev.preventDefault()); // Escape: the reads still need it
  for (const th of $("problems-table").tHead.rows[0].cells) th.addEventListener("click", () => sortProblems(th.dataset.key));
  for (const id of ["problems-filter", "problems-label", "problems-split", "problems-transferred"]) {
    $(id).addEventListener("input", renderProblems);
  }
  $("inspector-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    takeFilters();
    loadRollouts().catch(showError);
  });
  $("f-clear").addEventListener("click", () => {
    for (const id of Object.values(FILTERS)) $(id).value = "";
    takeFilters();
    loadRollouts().catch(showError);
  });
  $("page-older").addEventListener("click", () => {
    if (!inspector.next) return;
    inspector.pages.push(inspector.next);
    loadRollouts().catch(showError);
  });
  $("page-newer").addEventListener("click", () => {
    if (inspector.pages.length > 1) inspector.pages.pop();
    loadRollouts().catch(showError);
  });
  start();
}

document.addEventListener("DOMContentLoaded", wire);
