// The audit viewer's "Verify": checks one entry in this browser, independently of the server's own verification.
//
// 1. The leaf hash, from the entry's content: SHA-256(0x00 || JCS(entry)), where JCS is RFC 8785's canonical JSON
//    of {actor, created_at, id, kind, payload, subject, tenant} (entries written before the queue existed have
//    `seq` instead of `id`), as platform/firstmile/audit/canonical.py defines it.
// 2. Its inclusion in the latest signed checkpoint: the RFC 9162 (section 2.1.3.2) audit path from the leaf to
//    the checkpoint's root, interior nodes SHA-256(0x01 || left || right).
// 3. The checkpoint's Ed25519 signature (WebCrypto) over the note the browser builds itself:
//    "firstmile.dev/audit/<tenant>\n<tree size>\n<base64 root>\n<signed_at>\n".
// Only the data comes from the server (GET /admin/api/audit/<seq>/proof); every check is made here.

const encoder = new TextEncoder();

export function canonical(value) {
  // RFC 8785: keys sorted by UTF-16 code units (JavaScript's own string order), numbers as ECMAScript writes
  // them, strings escaped as JSON.stringify does; no whitespace.
  if (value === null || typeof value !== "object") {
    if (typeof value === "number" && !Number.isFinite(value)) throw new Error("a number without a JSON form");
    return JSON.stringify(value);
  }
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  const keys = Object.keys(value).sort();
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`).join(",")}}`;
}

function hex(bytes) {
  return Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, "0")).join("");
}

function unhex(text) {
  if (!/^([0-9a-f]{2})*$/.test(text)) throw new Error("not hex");
  return Uint8Array.from(text.match(/../g) || [], (pair) => parseInt(pair, 16));
}

async function sha256(...parts) {
  const length = parts.reduce((n, p) => n + p.length, 0);
  const joined = new Uint8Array(length);
  let at = 0;
  for (const part of parts) {
    joined.set(part, at);
    at += part.length;
  }
  return new Uint8Array(await crypto.subtle.digest("SHA-256", joined));
}

export async function leafHash(tenant, entry) {
  const form = { actor: entry.actor, created_at: entry.created_at, kind: entry.kind, payload: entry.payload,
    subject: entry.subject, tenant };
  if (entry.id) form.id = entry.id;
  else form.seq = entry.seq;
  return sha256(Uint8Array.of(0), encoder.encode(canonical(form)));
}

export async function rootFromPath(leafIndex, treeSize, leaf, path) {
  // RFC 9162 section 2.1.3.2, with BigInt: indexes may exceed 32 bits
  let fn = BigInt(leafIndex);
  let sn = BigInt(treeSize) - 1n;
  if (fn > sn) throw new Error("the leaf is outside the tree");
  let r = leaf;
  for (const node of path) {
    if (sn === 0n) throw new Error("the audit path is longer than the tree is deep");
    if ((fn & 1n) === 1n || fn === sn) {
      r = await sha256(Uint8Array.of(1), node, r);
      if ((fn & 1n) === 0n) {
        while ((fn & 1n) === 0n && fn !== 0n) {
          fn >>= 1n;
          sn >>= 1n;
        }
      }
    } else {
      r = await sha256(Uint8Array.of(1), r, node);
    }
    fn >>= 1n;
    sn >>= 1n;
  }
  if (sn !== 0n) throw new Error("the audit path is shorter than the tree is deep");
  return r;
}

function base64(bytes) {
  return btoa(String.fromCharCode(...bytes));
}

export async function verifyProof(proof) {
  const entry = proof.entry;
  const leaf = await leafHash(proof.tenant, entry);
  if (hex(leaf) !== proof.leaf_hash || hex(leaf) !== entry.leaf_hash) {
    return { ok: false, reason: "the entry's content does not hash to its leaf hash: it was altered" };
  }
  const path = proof.audit_path.map(unhex);
  let root;
  try {
    root = await rootFromPath(proof.leaf_index, proof.tree_size, leaf, path);
  } catch (error) {
    return { ok: false, reason: `the audit path is malformed: ${error.message}` };
  }
  const checkpoint = proof.checkpoint;
  if (hex(root) !== checkpoint.root_hash || checkpoint.tree_size !== proof.tree_size) {
    return { ok: false, reason: `the audit path does not lead to the root of checkpoint ${checkpoint.tree_size}` };
  }
  const note = `firstmile.dev/audit/${proof.tenant}\n${checkpoint.tree_size}\n${base64(root)}\n${checkpoint.signed_at}\n`;
  const raw = unhex(proof.public_key);
  const keyId = hex(await sha256(raw));
  if (keyId !== checkpoint.key_id) {
    return { ok: false, reason: `checkpoint ${checkpoint.tree_size} names key ${checkpoint.key_id.slice(0, 12)}…, not the key given` };
  }
  const key = await crypto.subtle.importKey("raw", raw, { name: "Ed25519" }, false, ["verify"]);
  const signed = await crypto.subtle.verify({ name: "Ed25519" }, key, unhex(checkpoint.signature), encoder.encode(note));
  if (!signed) {
    return { ok: false, reason: `the signature of checkpoint ${checkpoint.tree_size} does not verify` };
  }
  return {
    ok: true,
    reason: `leaf hash, inclusion at ${proof.leaf_index} of ${proof.tree_size}, and the checkpoint's Ed25519 signature ` +
      `by key ${keyId.slice(0, 12)}… all check out`,
  };
}

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-verify]");
  if (!button) return;
  const seq = button.dataset.verify;
  const verdict = document.querySelector(`[data-testid="verify-${seq}"]`);
  button.disabled = true;
  verdict.textContent = "checking…";
  verdict.dataset.verdict = "";
  try {
    const response = await fetch(`/admin/api/audit/${encodeURIComponent(seq)}/proof`, { credentials: "same-origin" });
    const answer = await response.json();
    if (!response.ok) {
      verdict.dataset.verdict = "unavailable";
      verdict.textContent = `Not checked: ${answer.detail}`;
      return;
    }
    const result = await verifyProof(answer);
    verdict.dataset.verdict = result.ok ? "verified" : "failed";
    verdict.textContent = `${result.ok ? "✓ Verified" : "✗ Failed"}: ${result.reason}`;
  } catch (error) {
    verdict.dataset.verdict = "failed";
    verdict.textContent = `✗ Failed: ${error.message}`;
  } finally {
    button.disabled = false;
  }
});
