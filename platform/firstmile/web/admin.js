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
