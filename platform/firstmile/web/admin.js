// Every admin page: path edits from the dashboard, the experiment manager's actions and the users page's erase,
// each through admin-api.js (the session's CSRF token; a refusal, or no answer at all, said as a sentence).
import { call } from "./admin-api.js";

// Path edits from the dashboard: PATCH /admin/api/paths/<key>.
document.addEventListener("submit", async (event) => {
  const form = event.target.closest("form.edit-path");
  if (!form) return;
  event.preventDefault();
  const status = document.querySelector('[data-testid="status"]');
  const { ok, answer, message } = await call(
    `/admin/api/paths/${encodeURIComponent(form.dataset.key)}`, { name: form.elements.name.value }, "PATCH");
  status.textContent = ok ? `Saved: version ${answer.version}` : `Not saved: ${message}`;
});

// The experiment manager: lifecycle buttons and the draft form call /admin/api/experiments.
function say(text) {
  const status = document.querySelector('[data-testid="status"][role="status"], [data-testid="status-line"]');
  if (status) status.textContent = text;
}

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-action][data-experiment]");
  if (!button) return;
  button.disabled = true;
  const id = encodeURIComponent(button.dataset.experiment);
  const { ok, message } = await call(`/admin/api/experiments/${id}/${button.dataset.action}`);
  if (ok) {
    window.location.reload();
  } else {
    say(`Not done: ${message}`);
    button.disabled = false;
  }
});

document.addEventListener("submit", async (event) => {
  const form = event.target.closest("form.draft-experiment");
  if (!form) return;
  event.preventDefault();
  const f = form.elements;
  const draft = {
    id: f.id.value,
    control: f.control_name.value,
    variants: [
      { name: f.control_name.value, path: f.control_path.value },
      { name: f.variant_name.value, path: f.variant_path.value },
    ],
    traffic_percent: Number(f.traffic_percent.value),
    planned_days: Number(f.planned_days.value),
  };
  const { ok, message } = await call("/admin/api/experiments", draft);
  if (ok) {
    window.location.reload();
  } else {
    say(`Not saved: ${message}`);
  }
});

// The users page: erase after the admin confirms (DELETE /admin/api/users/<id>, crypto-shredding).
document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-erase]");
  if (!button) return;
  const id = button.dataset.erase;
  if (!window.confirm(`Erase ${id}? Their key is destroyed and their rows deleted; this cannot be undone.`)) return;
  button.disabled = true;
  const { ok, answer, message } = await call(`/admin/api/users/${encodeURIComponent(id)}`, undefined, "DELETE");
  if (ok) {
    say(`Erased ${answer.user_id}: key destroyed, audit entry ${answer.audit_entry_id}.`);
    document.querySelector('[data-testid="end-user"]')?.remove();
  } else {
    say(`Not erased: ${message}`);
    button.disabled = false;
  }
});
