// The models page: promotes a version of the tenant's own model (POST /admin/api/models/<version>/promote) and
// rolls back to an older one (POST /admin/api/models/<version>/rollback), with the session's CSRF token. A refusal
// (application/problem+json) is shown as a sentence, the off-policy report of a gate refusal with it; after a
// change the page reloads to show the new stages and history, and says what was done.

import { call } from "./admin-api.js";

const status = document.querySelector('[data-testid="status"]');
const DONE_KEY = "firstmile-models-done";

function say(text, problem) {
  status.textContent = text;
  status.dataset.kind = problem ? "problem" : "done";
}

function refused(card, message, answer) {
  const outcome = card.querySelector('[data-testid="outcome"]');
  outcome.dataset.kind = "problem";
  outcome.textContent = `Not staged: ${message}`;
  if (answer && answer.report && answer.report.text) {
    const report = document.createElement("pre");
    report.className = "report";
    report.dataset.testid = "refused-report";
    report.textContent = answer.report.text;
    outcome.append(report);
  }
}

async function stage(button, rollback) {
  const card = button.closest("[data-version]");
  const version = card.dataset.version;
  let url = `/admin/api/models/${encodeURIComponent(version)}/rollback`;
  let body;
  let what = `Roll back to version ${version}: it serves everyone again`;
  if (!rollback) {
    const to = card.querySelector('[name="stage"]').value;
    body = { stage: to, force: card.querySelector('[name="force"]').checked };
    if (to === "canary") body.weight = Number(card.querySelector('[name="weight"]').value);
    url = `/admin/api/models/${encodeURIComponent(version)}/promote`;
    what = `Promote version ${version} to ${to}`;
  }
  if (!window.confirm(`${what}?`)) return;
  card.querySelectorAll("button").forEach((b) => (b.disabled = true));
  const { ok, answer, message } = await call(url, body);
  if (ok) {
    // the page reloads to show the new stages and history, and says what was done once it has
    window.sessionStorage.setItem(DONE_KEY, `Version ${version} is now in ${answer.stage}.`);
    window.location.reload();
  } else {
    card.querySelectorAll("button").forEach((b) => (b.disabled = false));
    refused(card, message, answer);
    say(`Version ${version} was not staged: ${message}`, true);
  }
}

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button");
  if (!button) return;
  if (button.matches("[data-promote]")) await stage(button, false);
  else if (button.matches("[data-rollback]")) await stage(button, true);
});

const done = window.sessionStorage.getItem(DONE_KEY);
if (done) {
  window.sessionStorage.removeItem(DONE_KEY);
  say(done, false);
}
