// The path editor: reads the form into the manifest's shape of a path, asks the server to check it (the manifest's
// own rules) and to preview the checklist, publishes it as a new version, compares versions and reverts.

import { call } from "./admin-api.js";

const form = document.querySelector("form.path-editor");
const key = form.dataset.key;
const api = `/admin/api/paths/${encodeURIComponent(key)}`;
const status = document.querySelector('[data-testid="status"]');

function value(text, op) {
  const raw = text.trim();
  if (op === "exists") return raw !== "false";
  try {
    return JSON.parse(raw);
  } catch {
    if (op === "in" || op === "not_in") return raw.split(",").map((v) => v.trim()).filter((v) => v !== "");
    return raw;
  }
}

function predicates(container) {
  return Array.from(container.querySelectorAll(":scope > [data-predicate]"), (row) => {
    const op = row.querySelector('[data-field="op"]').value;
    return { field: row.querySelector('[data-field="field"]').value.trim(), op,
      value: value(row.querySelector('[data-field="value"]').value, op) };
  });
}

function field(li, name) {
  return li.querySelector(`[data-field="${name}"]`);
}

export function collect() {
  const steps = Array.from(form.querySelectorAll("li[data-step]"), (li) => {
    const step = {
      id: field(li, "id").value.trim(),
      title: field(li, "title").value.trim(),
      description: field(li, "description").value,
      optional: field(li, "optional").checked,
      completion: { event: field(li, "event").value.trim(), where: predicates(li.querySelector('[data-predicates="where"]')) },
    };
    const listed = field(li, "prerequisites").value.split(",").map((p) => p.trim()).filter((p) => p !== "");
    if (field(li, "no_prerequisites").checked) step.prerequisites = [];
    else if (listed.length) step.prerequisites = listed;
    return step;
  });
  const f = form.elements;
  return {
    name: f.name.value.trim(),
    description: f.description.value,
    priority: Number(f.priority.value),
    activation_step: f.activation_step.value,
    targeting: predicates(form.querySelector('[data-predicates="targeting"]')),
    steps,
  };
}

function clearErrors() {
  form.querySelectorAll(".error").forEach((p) => (p.textContent = ""));
  form.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
  form.querySelector('[data-testid="errors"]').replaceChildren();
}

function showErrors(errors) {
  clearErrors();
  const list = form.querySelector('[data-testid="errors"]');
  const steps = form.querySelectorAll("li[data-step]");
  for (const error of errors) {
    const item = document.createElement("li");
    item.textContent = `${error.key}: ${error.message}`;
    list.append(item);
    const parts = error.key.split(".");
    if (parts[0] === "steps" && parts.length > 1 && steps[Number(parts[1])]) {
      const li = steps[Number(parts[1])];
      li.querySelector("[data-error-step]").textContent += `${parts.slice(2).join(".") || "step"}: ${error.message} `;
      const input = parts[2] === "completion" ? field(li, "event") : field(li, parts[2] || "id");
      if (input) input.setAttribute("aria-invalid", "true");
    } else {
      const slot = form.querySelector(`[data-error-for="${parts[0]}"]`) || form.querySelector('[data-error-for="steps"]');
      slot.textContent += `${error.message} `;
      const input = form.elements[parts[0]];
      if (input && input.setAttribute) input.setAttribute("aria-invalid", "true");
    }
  }
}

function showPreview(items) {
  const list = document.querySelector('[data-testid="preview"]');
  list.replaceChildren(...items.map((s) => {
    const li = document.createElement("li");
    li.dataset.stepId = s.id;
    li.className = s.available ? "open" : "locked";
    const title = document.createElement("strong");
    title.textContent = s.title;
    const when = document.createElement("small");
    when.textContent = s.available ? "open now" : `after ${s.waits_for.join(", ")}`;
    li.append(title, s.optional ? " (optional)" : "", s.activation ? " (activation)" : "", document.createElement("br"), when);
    return li;
  }));
}

function refreshActivation() {
  const select = form.elements.activation_step;
  const chosen = select.value;
  select.replaceChildren(...Array.from(form.querySelectorAll("li[data-step]"), (li) => {
    const option = document.createElement("option");
    option.value = field(li, "id").value.trim();
    option.textContent = `${field(li, "title").value.trim()} (${option.value})`;
    option.selected = option.value === chosen;
    return option;
  }));
}

async function check() {
  const { ok, answer, message } = await call(`${api}/validate`, collect());
  if (ok) {
    clearErrors();
    showPreview(answer.preview);
    status.textContent = "Valid: the preview shows what a new user would see.";
  } else {
    showErrors(answer?.errors || [{ key: "path", message }]);
    status.textContent = `Not valid: ${message}`;
  }
  return ok;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const { ok, answer, message } = await call(api, collect(), "PATCH");
  if (ok) {
    status.textContent = `Published version ${answer.version}.`;
    window.location.reload();
  } else {
    showErrors(answer?.errors || [{ key: "path", message }]);
    status.textContent = `Not published: ${message}`;
  }
});

form.addEventListener("input", (event) => {
  if (event.target.matches('[data-field="id"], [data-field="title"]')) refreshActivation();
});

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button");
  if (!button) return;
  const li = button.closest("li[data-step]");
  if (button.matches("[data-validate]")) {
    await check();
  } else if (button.matches("[data-move]") && li) {
    const sibling = Number(button.dataset.move) < 0 ? li.previousElementSibling : li.nextElementSibling;
    if (sibling) Number(button.dataset.move) < 0 ? sibling.before(li) : sibling.after(li);
    refreshActivation();
    button.focus();
  } else if (button.matches("[data-remove-step]") && li) {
    li.remove();
    refreshActivation();
  } else if (button.matches("[data-add-step]")) {
    const steps = form.querySelectorAll("li[data-step]");
    const fresh = steps[steps.length - 1].cloneNode(true);
    fresh.querySelectorAll("input, textarea").forEach((input) => {
      if (input.type === "checkbox") input.checked = false;
      else input.value = "";
    });
    fresh.querySelector('[data-predicates="where"]').replaceChildren();
    fresh.querySelector("[data-error-step]").textContent = "";
    steps[steps.length - 1].after(fresh);
    field(fresh, "id").focus();
  } else if (button.matches("[data-add-predicate]")) {
    const container = button.parentElement.querySelector(`[data-predicates="${button.dataset.addPredicate}"]`);
    container.append(document.getElementById("predicate-template").content.cloneNode(true));
  } else if (button.matches("[data-remove-predicate]")) {
    button.closest("[data-predicate]").remove();
  } else if (button.matches("[data-compare]")) {
    const { ok, answer, message } = await call(
      `${api}/diff?from=${button.dataset.compare}&to=${form.dataset.version}`, undefined, "GET");
    showDiff(ok ? answer : null, ok ? "" : message);
  } else if (button.matches("[data-revert]")) {
    if (!window.confirm(`Publish version ${button.dataset.revert}'s definition as a new version?`)) return;
    const { ok, answer, message } = await call(`${api}/revert`, { version: Number(button.dataset.revert) });
    if (ok) {
      status.textContent = `Reverted: version ${answer.version} has version ${button.dataset.revert}'s definition.`;
      window.location.reload();
    } else {
      status.textContent = `Not reverted: ${message}`;
    }
  }
});

function showDiff(diff, problem) {
  const section = document.querySelector('[data-testid="diff"]');
  section.replaceChildren();
  const title = document.createElement("h3");
  section.append(title);
  if (!diff) {
    title.textContent = `Not compared: ${problem}`;
    return;
  }
  title.textContent = `v${diff.from} → v${diff.to}`;
  const list = document.createElement("ul");
  const line = (text) => {
    const item = document.createElement("li");
    item.textContent = text;
    list.append(item);
  };
  for (const [name, change] of Object.entries(diff.fields)) line(`${name}: ${JSON.stringify(change.from)} → ${JSON.stringify(change.to)}`);
  for (const id of diff.steps_added) line(`step added: ${id}`);
  for (const id of diff.steps_removed) line(`step removed: ${id}`);
  for (const step of diff.steps_changed) {
    for (const [name, change] of Object.entries(step.fields)) line(`step ${step.id}, ${name}: ${JSON.stringify(change.from)} → ${JSON.stringify(change.to)}`);
  }
  if (diff.order_changed) line("the order of the steps changed");
  if (!list.children.length) line("no difference");
  section.append(list);
}
