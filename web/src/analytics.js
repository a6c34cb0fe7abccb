// The admin analytics dashboard: reads the filters from the page's form, asks /admin/api/analytics/* (the same
// handlers as /v1/analytics, behind the admin session), and draws each answer as a chart (Chart.js, bundled by
// esbuild at build time: no CDN) next to a table of the same numbers, with when it was computed and whether the
// answer is a stale one (the query failed and the last result was served).
import {
  BarController, BarElement, CategoryScale, Chart, Legend, LineController, LineElement, LinearScale, PointElement, Tooltip,
} from "chart.js";

Chart.register(BarController, BarElement, CategoryScale, LinearScale, LineController, LineElement, PointElement, Tooltip,
  Legend);

const form = document.querySelector("form.analytics-filter");
const charts = new Map();
window.firstmileCharts = charts; // for the browser tests: which charts were drawn, from which numbers

const percent = (v) => (v === null || v === undefined ? "—" : `${(v * 100).toFixed(1)}%`);
const duration = (s) => {
  if (s === null || s === undefined) return "—";
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
};

function query(extra = {}) {
  const params = new URLSearchParams();
  for (const [name, value] of new FormData(form)) if (String(value).trim() !== "") params.set(name, String(value).trim());
  for (const [name, value] of Object.entries(extra)) params.set(name, value);
  return params;
}

async function ask(name, params) {
  const response = await fetch(`/admin/api/analytics/${name}?${params}`, { credentials: "same-origin" });
  const body = await response.json();
  return { ok: response.ok, body };
}

function section(name) {
  return document.querySelector(`[data-section="${name}"]`);
}

function fresh(name, body) {
  const note = section(name).querySelector("[data-freshness]");
  const at = new Date(body.computed_at).toISOString().slice(0, 19).replace("T", " ");
  note.textContent = body.stale ? `stale: the query failed, showing the result computed at ${at} UTC` : `computed at ${at} UTC`;
  note.dataset.stale = String(body.stale);
}

function problem(name, body) {
  const box = section(name);
  box.querySelector("[data-freshness]").textContent = "";
  box.querySelector("[data-problem]").textContent = body.detail || "the query failed";
  box.querySelector("tbody").replaceChildren();
  charts.get(name)?.destroy();
  charts.delete(name);
}

function rows(name, cells) {
  const box = section(name);
  box.querySelector("[data-problem]").textContent = "";
  box.querySelector("tbody").replaceChildren(...cells.map((values) => {
    const tr = document.createElement("tr");
    for (const v of values) {
      const td = document.createElement("td");
      td.textContent = String(v);
      tr.append(td);
    }
    return tr;
  }));
  box.querySelector("[data-empty]").hidden = cells.length > 0;
}

function bars(name, labels, values, label, max) {
  charts.get(name)?.destroy();
  const canvas = section(name).querySelector("canvas");
  const chart = new Chart(canvas, {
    type: "bar",
    data: { labels, datasets: [{ label, data: values, backgroundColor: "#1f6feb" }] },
    options: { animation: false, responsive: true, maintainAspectRatio: false,
      scales: { y: { beginAtZero: true, ...(max ? { max } : {}) } }, plugins: { legend: { display: false } } },
  });
  charts.set(name, chart);
}

function line(name, labels, values, label, max) { // a percentage over time
  charts.get(name)?.destroy();
  const canvas = section(name).querySelector("canvas");
  const chart = new Chart(canvas, {
    type: "line",
    data: { labels, datasets: [{ label, data: values, borderColor: "#1f6feb", backgroundColor: "#1f6feb", spanGaps: false }] },
    options: { animation: false, responsive: true, maintainAspectRatio: false,
      scales: { y: { beginAtZero: true, ...(max ? { max } : {}), ticks: { callback: (v) => `${v}%` } } },
      plugins: { legend: { display: false } } },
  });
  charts.set(name, chart);
}

function failed(name, body) {
  problem(name, body);
  section(name).querySelector("[data-summary]").textContent = "";
  section(name).querySelector("[data-empty]").hidden = true;
}

function empty(name, text) {
  const box = section(name);
  box.querySelector("[data-problem]").textContent = "";
  box.querySelector("tbody").replaceChildren();
  box.querySelector("[data-summary]").textContent = "";
  const note = box.querySelector("[data-empty]");
  note.textContent = text;
  note.hidden = false;
  charts.get(name)?.destroy();
  charts.delete(name);
}

async function funnel(params) {
  const { ok, body } = await ask("funnel", params);
  if (!ok) return problem("funnel", body);
  fresh("funnel", body);
  rows("funnel", [["started", body.started, "", "", ""], ...body.steps.map((s) => [s.title, s.users,
    percent(s.conversion_from_previous), percent(s.conversion_from_start), duration(s.median_seconds_from_previous)])]);
  bars("funnel", ["started", ...body.steps.map((s) => s.title)], [body.started, ...body.steps.map((s) => s.users)], "users");
}

async function dropoff(params) {
  const { ok, body } = await ask("dropoff", params);
  if (!ok) return problem("dropoff", body);
  fresh("dropoff", body);
  rows("dropoff", body.steps.map((s) => [s.title, s.reached_previous, s.reached, s.dropped, percent(s.share)]));
  bars("dropoff", body.steps.map((s) => s.title), body.steps.map((s) => (s.share ?? 0) * 100), "% dropped", 100);
}

async function cohorts(params) {
  const { ok, body } = await ask("cohorts", params);
  if (!ok) return problem("cohorts", body);
  fresh("cohorts", body);
  const box = section("cohorts");
  box.querySelector("[data-problem]").textContent = "";
  const head = box.querySelector("thead tr");
  head.replaceChildren(...["cohort week", "users", ...Array.from({ length: body.weeks }, (_, i) => `week ${i}`)].map((t) => {
    const th = document.createElement("th");
    th.textContent = t;
    return th;
  }));
  box.querySelector("tbody").replaceChildren(...body.cohorts.map((c) => {
    const tr = document.createElement("tr");
    const cells = [c.cohort_week, c.users, ...c.weeks.map((w) => w)];
    for (const cell of cells) {
      const td = document.createElement("td");
      if (typeof cell === "object") {
        td.textContent = percent(cell.retention);
        // white to a mid blue that keeps dark text above 4.5:1 (WCAG AA) at every share
        const mix = (light, strong) => Math.round(light + (strong - light) * Math.min(1, cell.retention));
        td.style.background = `rgb(${mix(255, 122)}, ${mix(255, 167)}, ${mix(255, 240)})`;
        td.style.color = "#1b1f24";
      } else td.textContent = String(cell);
      tr.append(td);
    }
    return tr;
  }));
  box.querySelector("[data-empty]").hidden = body.cohorts.length > 0;
}

async function activation(params) {
  // one pair of answers for three sections: the rate per path, its weeks, and the time to activation's histogram
  const [rate, tta] = await Promise.all([ask("activation-rate", params), ask("time-to-activation", params)]);
  histogram(tta);
  weeks(rate);
  if (!rate.ok) return problem("activation", rate.body);
  fresh("activation", rate.body);
  const t = tta.ok ? tta.body : { p50_seconds: null, p90_seconds: null };
  const summary = section("activation").querySelector("[data-summary]");
  summary.textContent = `${percent(rate.body.rate)} of ${rate.body.users} users activated; time to activation: ` +
    `p50 ${duration(t.p50_seconds)}, p90 ${duration(t.p90_seconds)}`;
  rows("activation", rate.body.paths.map((p) => [p.path, p.users, p.activated, percent(p.rate)]));
  bars("activation", rate.body.paths.map((p) => p.path), rate.body.paths.map((p) => (p.rate ?? 0) * 100), "% activated", 100);
}

function histogram({ ok, body }) {
  const name = "time-to-activation";
  if (!ok) return failed(name, body);
  fresh(name, body);
  if (body.activated === 0) return empty(name, "No user activated in this range.");
  const buckets = body.histogram;
  const top = buckets.reduce((best, b) => (b.users > best.users ? b : best), buckets[0]);
  section(name).querySelector("[data-summary]").textContent = `${body.activated} of ${body.users} users activated; ` +
    `most of them in ${top.label} (${top.users} users); p50 ${duration(body.p50_seconds)}, p90 ${duration(body.p90_seconds)}`;
  rows(name, buckets.map((b) => [b.label, b.users, percent(b.users / body.activated)]));
  bars(name, buckets.map((b) => b.label), buckets.map((b) => b.users), "activated users");
}

function weeks({ ok, body }) {
  const name = "activation-weeks";
  if (!ok) return failed(name, body);
  fresh(name, body);
  if (body.users === 0) return empty(name, "No user in this range.");
  const started = body.weeks.filter((w) => w.rate !== null);
  const low = started.reduce((a, w) => (w.rate < a.rate ? w : a), started[0]);
  const high = started.reduce((a, w) => (w.rate > a.rate ? w : a), started[0]);
  section(name).querySelector("[data-summary]").textContent = `${body.weeks.length} signup weeks from ` +
    `${body.weeks[0].cohort_week}: lowest ${percent(low.rate)} (week of ${low.cohort_week}), highest ` +
    `${percent(high.rate)} (week of ${high.cohort_week}); overall ${percent(body.rate)}`;
  rows(name, body.weeks.map((w) => [w.cohort_week, w.users, w.activated, percent(w.rate)]));
  line(name, body.weeks.map((w) => w.cohort_week), body.weeks.map((w) => (w.rate === null ? null : w.rate * 100)),
    "% activated", 100);
}

async function refresh() {
  const params = query();
  const status = document.querySelector('[data-testid="status"]');
  status.textContent = "Loading…";
  document.body.dataset.loaded = "false";
  const withPath = params.get("path") ? [funnel(params), dropoff(params)] : [];
  const withoutPath = query(); // activation compares the paths, cohorts span them: every filter but the path
  for (const name of ["window", "path", "path_version"]) withoutPath.delete(name);
  await Promise.all([...withPath, cohorts(withoutPath), activation(withoutPath)]);
  status.textContent = "Up to date.";
  document.body.dataset.loaded = "true";
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const url = new URL(window.location.href);
  url.search = query().toString();
  window.history.replaceState(null, "", url);
  refresh();
});

refresh();
