// What the admin pages' scripts share: a call to the admin API with the session's CSRF token, and a refusal
// (application/problem+json) turned into a sentence for people, never shown as JSON.

export function csrf() {
  return document.querySelector('meta[name="csrf-token"]').content;
}

// A problem document as people read it: its title and detail, each field's message the detail does not already
// say, what to do after a lost session, and the request id of a server error.
export function explain(code, answer, fallback) {
  if (!answer || typeof answer !== "object" || !answer.detail) return `${fallback} (HTTP ${code}).`;
  const detail = String(answer.detail);
  const fields = (Array.isArray(answer.errors) ? answer.errors : [])
    .filter((e) => e && e.message && !detail.includes(e.message))
    .map((e) => `${e.key || "request"}: ${e.message}`);
  let text = `${answer.title ? `${answer.title}: ` : ""}${detail}${fields.length ? ` (${fields.join("; ")})` : ""}`;
  if (!/[.!?]$/.test(text)) text += ".";
  if (code === 401) text += " Sign in again: /admin/signin.";
  if (code >= 500 && answer.request_id) text += ` Request id ${answer.request_id}.`;
  return text;
}

// `method` defaults to POST. The answer: { ok, answer (the parsed JSON, or null), message (a refusal's sentence) }.
export async function call(url, body, method = "POST") {
  let response;
  try {
    response = await fetch(url, {
      method,
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
    });
  } catch (error) {
    return { ok: false, message: `The request did not reach the server (${error.message}); nothing was changed.` };
  }
  let answer = null;
  try {
    answer = await response.json();
  } catch {
    answer = null;
  }
  if (response.ok) return { ok: true, answer };
  return { ok: false, answer, message: explain(response.status, answer, response.statusText || "The server refused") };
}
