// The review queue: decides one review (POST /admin/api/reviews/<id>/decide), the selected ones at once
// (POST /admin/api/reviews/bulk: all or none) and revokes a segment pin (POST /admin/api/overrides/<id>/revoke),
// with the session's CSRF token. A refusal (application/problem+json) is shown as a sentence, never as JSON.

import { call } from "./admin-api.js";

const status = document.querySelector('[data-testid="status"]');
const DONE = { approved: "Approved", rejected: "Rejected", right: "Marked right", wrong: "Marked wrong" };

function say(text, problem) {
  status.textContent = text;
  status.dataset.kind = problem ? "problem" : "done";
}

function when(iso) {
  return iso ? iso.slice(0, 19).replace("T", " ") : "";
}

// A decided review: its card says so and offers nothing more.
function showDecided(review) {
  const card = document.querySelector(`[data-review-id="${review.id}"]`);
  if (!card) return;
  card.dataset.status = review.status;
  card.querySelector('[data-testid="review-status"]').textContent = review.status;
  card.querySelector('[data-testid="actions"]')?.remove();
  card.querySelector("[data-select]")?.remove();
  const outcome = card.querySelector('[data-testid="outcome"]');
  outcome.dataset.kind = "done";
  const parts = [`${DONE[review.status] || review.status} by ${review.decided_by} at ${when(review.decided_at)}`];
  if (review.better_path) parts.push(`better path: ${review.better_path}`);
  if (review.note) parts.push(`note: “${review.note}”`);
  outcome.textContent = parts.join("; ");
}

function showRefused(card, message) {
  const outcome = card.querySelector('[data-testid="outcome"]');
  outcome.dataset.kind = "problem";
  outcome.textContent = message;
}

async function decide(button) {
  const card = button.closest("[data-review-id]");
  const id = card.dataset.reviewId;
  const decision = button.dataset.decide;
  const body = { decision };
  const note = card.querySelector('[name="note"]').value.trim();
  if (note) body.note = note;
  const better = card.querySelector('[name="better_path"]');
  if (better && better.value && decision === "wrong") body.better_path = better.value;
  card.querySelectorAll("[data-decide]").forEach((b) => (b.disabled = true));
  const { ok, answer, message } = await call(`/admin/api/reviews/${encodeURIComponent(id)}/decide`, body);
  if (ok) {
    showDecided(answer);
    say(`Review ${id}: ${(DONE[answer.status] || answer.status).toLowerCase()}.`, false);
  } else {
    card.querySelectorAll("[data-decide]").forEach((b) => (b.disabled = false));
    showRefused(card, `Not decided: ${message}`);
    say(`Review ${id} was not decided: ${message}`, true);
  }
}

async function bulk(button) {
  const ids = Array.from(document.querySelectorAll("[data-select]:checked"), (box) => Number(box.dataset.select));
  const verb = button.dataset.bulk;
  if (!ids.length) {
    say(`Select the reviews to ${verb} first.`, true);
    return;
  }
  const body = { ids, decision: verb };
  const note = document.querySelector('[name="bulk_note"]').value.trim();
  if (note) body.note = note;
  button.disabled = true;
  const { ok, answer, message } = await call("/admin/api/reviews/bulk", body);
  button.disabled = false;
  if (ok) {
    answer.decided.forEach(showDecided);
    const all = document.querySelector("[data-select-all]");
    if (all) all.checked = false;
    say(`${answer.decided.length} reviews ${verb === "approve" ? "approved" : "rejected"}: ${ids.join(", ")}.`, false);
  } else {
    say(`None of the ${ids.length} selected reviews was decided: ${message}`, true);
  }
}

async function revoke(button) {
  const id = button.dataset.revoke;
  if (!window.confirm(`Revoke pin ${id}? Users who start from now on are placed by the planner again.`)) return;
  button.disabled = true;
  const { ok, message } = await call(`/admin/api/overrides/${encodeURIComponent(id)}/revoke`);
  if (ok) {
    button.closest("tr").remove();
    say(`Pin ${id} is revoked: new users are placed by the planner again.`, false);
  } else {
    button.disabled = false;
    say(`Pin ${id} was not revoked: ${message}`, true);
  }
}

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button");
  if (!button) return;
  if (button.matches("[data-decide]")) await decide(button);
  else if (button.matches("[data-bulk]")) await bulk(button);
  else if (button.matches("[data-revoke]")) await revoke(button);
});

document.addEventListener("change", (event) => {
  if (!event.target.matches("[data-select-all]")) return;
  document.querySelectorAll("[data-select]").forEach((box) => (box.checked = event.target.checked));
});
