"""What PostgreSQL alone can do: a start's own transaction driven by ``pgbench``, with no application at all.

The start's write transaction, statement for statement as the API sends it (the tenant's
``set_config``, ``_START`` of the onboarding repository and ``_QUEUE`` of the audit
repository, between BEGIN and COMMIT, prepared, as ``firstmile_app`` through row-level
security), run by ``pgbench`` with the same number of connections as the HTTP runs. The
values differ only where ``pgbench`` cannot make them: the user id is ``ceiling-<random>``,
the times are PostgreSQL's clock, the event and entry ids are drawn by
``gen_random_uuid()``, and the JSON documents are those of one real start.

It is a ceiling, not a model: the relay's publish and delete of the outbox row and the
sequencer's move of the queued entry come on top of it in the real system, and pgbench's
own CPU is far below an HTTP stack's. So no build of the API can start more users per
second on this machine than this run commits, nor answer faster at the same concurrency.

The queued audit entries it writes carry a made-up leaf hash (pgbench cannot hash), which a
sequencer refuses as tampered, stopping that tenant's log: run it where no sequencer runs
(``benchmarks api`` runs it last, on its own database that the next run recreates).
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import BenchError, _log
from benchmarks.cpu import CpuUse, _cpu_meter
from firstmile.audit import repository as audit_repo
from firstmile.onboarding import repository as onboarding_repo

# One real start's documents (persona developer, the rules planner's decision, its audit payload).
_TRAITS = '{"persona": "developer"}'
_DECISION = (
    '{"rule": "developer-quickstart: persona eq \'developer\'", "model": "path_classifier", "stage": "production", '
    '"planner": "rules-1", "fallback": "rules", "features": {"use_case": null, "company_size": null, '
    '"user_persona": "developer", "session_count": null, "signup_source": null, "steps_completed": null, '
    '"engagement_score": null, "time_since_signup": null, "avg_session_duration": null}, "priority": 100, '
    '"inference": "in-process", "confidence": null, "decided_at": "2026-12-07T00:25:22.996235+00:00", '
    '"latency_ms": 0.06, "selected_by": "rules", "model_version": null, "feature_source": "absent", '
    '"fallback_reason": "not_deployed", "candidates_evaluated": 2}'
)
_AUDIT_PAYLOAD = (
    '{"confidence":null,"decision":"path_selection","event_id":"6f1c3c1e-0d7e-4b8e-9a59-1c1d1e1f2a2b",'
    '"fallback":"rules","fallback_reason":"not_deployed","inputs":{"features":{"avg_session_duration":null,'
    '"company_size":null,"engagement_score":null,"session_count":null,"signup_source":null,'
    '"steps_completed":null,"time_since_signup":null,"use_case":null,"user_persona":"developer"},'
    '"personal_traits":[],"traits":{"persona":"developer"}},"model":"rules-1","model_version":"rules-1",'
    '"output":{"path_id":"developer-quickstart","path_version":1},"selected_by":"rules","shadow":null}'
)

_USER = "('ceiling-' || :n)"
_START_VALUES = {
    "tid": ":tid",
    "uid": _USER,
    "traits": ":traits",
    "pii": "NULL",
    "email_index": "NULL",
    "path_key": "'developer-quickstart'",
    "path_version": "1",
    "current_step": "'create-api-key'",
    "decision": ":decision",
    "now": "now()",
    "pkey": "7",
    "events": "jsonb_build_array(jsonb_build_object('event_id', gen_random_uuid(), "
    "'event_type', 'onboarding.started', 'payload', CAST(:decision AS jsonb)))",
}
_QUEUE_VALUES = {
    "tenant": ":tid",
    "created_at": "clock_timestamp()",
    "entry_id": "gen_random_uuid()",
    "kind": "'decision'",
    "actor": "'path_planner'",
    "subject": _USER,
    "payload": ":audit_payload",
    "leaf": ":leaf",
}
_PARAM = re.compile(r"(?<![:\w]):(\w+)")


def _pgbench_sql(statement: str, values: dict[str, str]) -> str:
    """``statement`` (SQLAlchemy ``:name`` parameters) with each parameter replaced by its pgbench form."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise BenchError(f"no value for :{name} (the statement changed: update benchmarks/ceiling.py)")
        return values[name]

    return " ".join(_PARAM.sub(sub, statement).split())


def pgbench_script() -> str:
    """The start's transaction as a pgbench script (one statement per line)."""
    return "\n".join(
        [
            r"\set n random(1, 1000000000000)",
            "BEGIN;",
            "SELECT set_config('firstmile.tenant_id', :tid, true);",
            _pgbench_sql(onboarding_repo._START.named, _START_VALUES) + ";",
            _pgbench_sql(audit_repo._QUEUE.named, _QUEUE_VALUES) + ";",
            "COMMIT;",
            "",
        ]
    )


def find_pgbench() -> str:
    found = shutil.which("pgbench") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"))), None)
    if found is None:
        raise BenchError("pgbench not found (Debian's postgresql package has it in /usr/lib/postgresql/*/bin)")
    return found


def pgbench_command(pgbench: str, script: Path, tenant_id: uuid.UUID) -> list[str]:
    """pgbench with the script and its variables (add the clients, the duration and the database)."""
    command = [pgbench, "-n", "-M", "prepared", "-f", str(script), "-D", f"tid={tenant_id}"]
    command += ["-D", f"traits={_TRAITS}", "-D", f"decision={_DECISION}", "-D", f"audit_payload={_AUDIT_PAYLOAD}"]
    return [*command, "-D", "leaf=\\x" + "ab" * 32]


@dataclass(frozen=True)
class Ceiling:
    """One pgbench run of the start's transaction."""

    tps: float
    transactions: int
    failed: int
    p50_ms: float
    p95_ms: float
    cpu: CpuUse

    @property
    def postgres_us(self) -> float:
        return self.cpu.postgres_s / self.transactions * 1e6 if self.transactions else float("nan")

    @property
    def pgbench_us(self) -> float:
        return self.cpu.wrk_s / self.transactions * 1e6 if self.transactions else float("nan")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def run_ceiling(app_dsn: str, tenant_id: uuid.UUID, postmaster: int | None, connections: int, seconds: int) -> Ceiling:
    """Run the start's transaction through pgbench for ``seconds`` on ``connections`` connections."""
    pgbench = find_pgbench()
    threads = 2 if connections >= 2 else 1
    with tempfile.TemporaryDirectory(prefix="firstmile-ceiling-") as tmp_name:
        tmp = Path(tmp_name)
        script = tmp / "start.sql"
        script.write_text(pgbench_script(), encoding="utf-8")
        common = pgbench_command(pgbench, script, tenant_id)
        _log(f"ceiling: warming up pgbench (2s, {connections} connections)")
        subprocess.run([*common, "-c", str(connections), "-j", str(threads), "-T", "2", app_dsn], check=True,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
        _log(f"ceiling: measuring the start's transaction alone ({seconds}s, {connections} connections)")
        out: list[CpuUse] = []
        with _cpu_meter(-1, postmaster, out):
            done = subprocess.run(
                [*common, "-c", str(connections), "-j", str(threads), "-T", str(seconds), "-l",
                 "--log-prefix", str(tmp / "tx"), app_dsn],
                capture_output=True, text=True, timeout=seconds + 60, cwd=tmp,
            )  # fmt: skip
        if done.returncode != 0:
            raise BenchError(f"pgbench failed: {done.stderr[-2000:]}")
        latencies = [
            int(line.split()[2]) / 1000.0
            for log in tmp.glob("tx*")
            for line in log.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
    tps = re.search(r"tps = ([\d.]+)", done.stdout)
    processed = re.search(r"number of transactions actually processed: (\d+)", done.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    if tps is None or processed is None:
        raise BenchError(f"unexpected pgbench output: {done.stdout[-2000:]}")
    return Ceiling(
        tps=float(tps.group(1)),
        transactions=int(processed.group(1)),
        failed=int(failed.group(1)) if failed else 0,
        p50_ms=_pct(latencies, 50),
        p95_ms=_pct(latencies, 95),
        cpu=out[0],
    )
