// Path edits from the dashboard: PATCH /admin/api/paths/<key> with the session's CSRF token.
document.addEventListener("submit", async (event) => {
  const form = event.target.closest("form.edit-path");
  if (!form) return;
  event.preventDefault();
  const token = document.querySelector('meta[name="csrf-token"]').content;
  const status = document.querySelector('[data-testid="status"]');
  const response = await fetch(`/admin/api/paths/${encodeURIComponent(form.dataset.key)}`, {
    method: "PATCH",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": token },
    body: JSON.stringify({ name: form.elements.name.value }),
    credentials: "same-origin",
  });
  const body = await response.json();
  status.textContent = response.ok ? `Saved: version ${body.version}` : `Not saved: ${body.detail}`;
});

// The experiment manager: lifecycle buttons and the draft form call /admin/api/experiments with the CSRF token.
function csrf() {
  return document.querySelector('meta[name="csrf-token"]').content;
}

function say(text) {
  const status = document.querySelector('[data-testid="status"][role="status"], [data-testid="status-line"]');
  if (status) status.textContent = text;
}

async function post(url, body) {
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  const answer = await response.json();
  return { ok: response.ok, answer };
}

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-action][data-experiment]");
  if (!button) return;
  button.disabled = true;
  const id = encodeURIComponent(button.dataset.experiment);
  const { ok, answer } = await post(`/admin/api/experiments/${id}/${button.dataset.action}`);
  if (ok) {
    window.location.reload();
  } else {
    say(`Not done: ${answer.detail}`);
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
  const { ok, answer } = await post("/admin/api/experiments", draft);
  if (ok) {
    window.location.reload();
  } else {
    say(`Not saved: ${answer.detail}`);
  }
});

// The users page: erase after the admin confirms (DELETE /admin/api/users/<id>, crypto-shredding).
document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-erase]");
  if (!button) return;
  const id = button.dataset.erase;
  if (!window.confirm(`Erase ${id}? Their key is destroyed and their rows deleted; this cannot be undone.`)) return;
  button.disabled = true;
  const response = await fetch(`/admin/api/users/${encodeURIComponent(id)}`, {
    method: "DELETE",
    headers: { "X-CSRF-Token": csrf() },
    credentials: "same-origin",
  });
  const answer = await response.json();
  if (response.ok) {
    say(`Erased ${answer.user_id}: key destroyed, audit entry ${answer.audit_entry_id}.`);
    document.querySelector('[data-testid="end-user"]')?.remove();
  } else {
    say(`Not erased: ${answer.detail}`);
    button.disabled = false;
  }
});
