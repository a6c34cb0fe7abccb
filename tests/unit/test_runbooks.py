"""The runbooks of docs/operations.md stay complete: one per alert of the chart, one per row of the
design's failure table, none for an alert that is gone, and every `firstmile` command they show exists.

The chart sets each alert's ``runbook_url`` to ``docs/operations.md#runbook-<alert name in lower case>``
(``templates/prometheusrule.yaml``), so the anchors here are what those links land on.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import yaml

from tests.factories import ROOT
from tests.unit.test_readme import options_named, resolve, section

OPERATIONS = ROOT / "docs" / "operations.md"
CHART = ROOT / "helm" / "firstmile"

# One per row of "Failure Modes & Fallbacks" in the design (shared/seed/onboarding-system-design.txt).
FAILURE_MODES: dict[str, str] = {
    "planner-unavailable": "Path Planner Agent unavailable",
    "feature-store-timeout": "Feature Store timeout",
    "inference-latency": "ML inference high latency",
    "nudge-delivery": "Nudge delivery failure",
    "clickhouse-unavailable": "ClickHouse",
    "redis-unavailable": "Redis",
    "pii-detection": "PII detection",
}
# What every failure-mode runbook says, in this order of use.
FAILURE_LABELS = ("What Firstmile does", "How you see it", "What to do", "Impact and SLA")
MIN_LINES = 3  # non-empty lines, headings aside, between an anchor and the next

ANCHOR = re.compile(r'<a id="runbook-([a-z0-9-]+)"></a>')
LINK = re.compile(r"\]\(#(runbook-[a-z0-9-]+)\)")
HEADING = re.compile(r"^#{1,6} ")
SECTION_END = re.compile(r"^#{2,3} ")  # a runbook's own heading is ####; ## and ### end it
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`\n]+)`")
# A command line: `firstmile …` at the start of a line (after an optional `$ ` prompt), or after the
# `--` of `kubectl exec … --`. Namespaces and names such as `-n firstmile` or `firstmile-api` are not.
COMMAND = re.compile(r"(?:^|\s--\s+)(?:\$\s+)?(firstmile(?:\s+[^\s|;&#]+)+)")


def chart_alerts(chart: Path = CHART) -> list[str]:
    """Every alert the chart can render: the rules files (parsed), and any ``alert:`` written in a template."""
    alerts: list[str] = []
    for path in sorted((chart / "rules").glob("*.y*ml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for group in document.get("groups") or []:
            alerts.extend(str(rule["alert"]) for rule in group.get("rules") or [] if "alert" in rule)
    for path in sorted((chart / "templates").iterdir()):
        if path.suffix in (".yaml", ".yml", ".tpl"):
            text = path.read_text(encoding="utf-8")
            alerts.extend(re.findall(r"^\s*(?:-\s+)?alert:\s*[\"']?([A-Za-z][A-Za-z0-9_]*)", text, re.MULTILINE))
    return alerts


def runbooks(text: str) -> str:
    """The ``## Runbooks`` section of the operations guide."""
    return section(text, "Runbooks")


def anchored_sections(text: str) -> dict[str, list[list[str]]]:
    """Each runbook anchor id with the body after each of its occurrences (its lines up to the next
    anchor or ``##``/``###`` heading)."""
    found: dict[str, list[list[str]]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = ANCHOR.search(line)
        if match is None:
            continue
        body: list[str] = []
        for following in lines[i + 1 :]:
            if ANCHOR.search(following) or SECTION_END.match(following):
                break
            body.append(following)
        found.setdefault(f"runbook-{match.group(1)}", []).append(body)
    return found


def _check_runbook(anchor: str, bodies: list[list[str]] | None, must_name: str) -> list[str]:
    if not bodies:
        return [f'no runbook for {must_name}: add <a id="{anchor}"></a> and its section']
    if len(bodies) > 1:
        return [f"{anchor}: {len(bodies)} anchors with this id, expected one"]
    body = bodies[0]
    content = [line for line in body if line.strip() and not HEADING.match(line)]
    problems = []
    if len(content) < MIN_LINES:
        problems.append(f"{anchor}: the runbook has {len(content)} line(s), expected at least {MIN_LINES}")
    if must_name.lower() not in "\n".join(body).lower():
        problems.append(f"{anchor}: the runbook does not name {must_name}")
    return problems


def check_alert_runbooks(text: str, alerts: list[str]) -> list[str]:
    """Alerts without exactly one runbook (anchor ``runbook-<alert lower>``) of some substance naming them."""
    sections = anchored_sections(runbooks(text))
    problems = [
        f"{alert}: defined more than once in the chart" for alert in sorted(set(alerts)) if alerts.count(alert) > 1
    ]
    for alert in sorted(set(alerts)):
        problems.extend(_check_runbook(f"runbook-{alert.lower()}", sections.get(f"runbook-{alert.lower()}"), alert))
    return problems


def check_failure_runbooks(text: str, modes: dict[str, str] = FAILURE_MODES) -> list[str]:
    """Failure modes without exactly one runbook that names the failure and has the four parts."""
    sections = anchored_sections(runbooks(text))
    problems = []
    for slug, name in modes.items():
        anchor = f"runbook-failure-{slug}"
        bodies = sections.get(anchor)
        found = _check_runbook(anchor, bodies, name)
        problems.extend(found)
        if bodies and not found:
            body = "\n".join(bodies[0])
            problems.extend(f"{anchor}: no **{label}.** part" for label in FAILURE_LABELS if f"**{label}" not in body)
    return problems


def check_stale_runbooks(text: str, alerts: list[str], modes: dict[str, str] = FAILURE_MODES) -> list[str]:
    """Runbook anchors for alerts or failure modes that no longer exist, and runbook links that lead nowhere."""
    known = {f"runbook-{alert.lower()}" for alert in alerts} | {f"runbook-failure-{slug}" for slug in modes}
    anchors = {f"runbook-{found}" for found in ANCHOR.findall(text)}
    problems = [
        f"{anchor}: a runbook for an alert or failure mode that does not exist" for anchor in sorted(anchors - known)
    ]
    problems.extend(f"a link to #{target} leads nowhere" for target in sorted(set(LINK.findall(text)) - anchors))
    return problems


def runbook_commands(text: str) -> list[str]:
    """The `firstmile …` commands the Runbooks section shows, in code blocks and inline code."""
    body = runbooks(text)
    snippets = [line for block in FENCE.findall(body) for line in block.splitlines()]
    snippets.extend(INLINE.findall(FENCE.sub("", body)))
    commands = []
    for snippet in snippets:
        for match in COMMAND.finditer(snippet):
            # Placeholders (`<version>`, `…`) stand for arguments: left out; `firstmile …` alone is prose.
            words = [word for word in match.group(1).split() if not word.startswith(("…", "<"))]
            if len(words) > 1:
                commands.append(" ".join(words))
    return commands


def check_runbook_commands(text: str) -> list[str]:
    """Commands of the runbooks that the CLI does not have: unknown (sub)commands, groups, unknown options."""
    problems = []
    for command in runbook_commands(text):
        for path, found in resolve(command):
            if found is None:
                problems.append(f"{command!r}: no command {path!r}")
            elif isinstance(found, click.Group):
                problems.append(f"{command!r}: {path!r} is a group; name its subcommand")
            else:
                known = {opt for param in found.params for opt in (*param.opts, *param.secondary_opts)}
                known.add("--help")
                problems.extend(
                    f"{command!r}: {path!r} has no option {opt}" for opt in options_named(command) if opt not in known
                )
    return problems


def test_the_chart_links_each_alert_to_its_anchor() -> None:
    template = (CHART / "templates" / "prometheusrule.yaml").read_text(encoding="utf-8")
    assert '"%s#runbook-%s" $pr.runbookBaseUrl (lower $rule.alert)' in template
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert values["metrics"]["prometheusRule"]["runbookBaseUrl"] == "docs/operations.md"


def test_every_alert_has_one_runbook() -> None:
    alerts = chart_alerts()
    assert len(alerts) >= 10, f"the alert rules were not found: {alerts}"
    assert check_alert_runbooks(OPERATIONS.read_text(encoding="utf-8"), alerts) == []


def test_every_failure_mode_has_one_runbook() -> None:
    assert check_failure_runbooks(OPERATIONS.read_text(encoding="utf-8")) == []


def test_no_runbook_for_something_that_is_gone() -> None:
    assert check_stale_runbooks(OPERATIONS.read_text(encoding="utf-8"), chart_alerts()) == []


def test_every_command_in_the_runbooks_exists() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    commands = runbook_commands(text)
    assert any(c.startswith("firstmile events replay-dlq") for c in commands), commands
    assert check_runbook_commands(text) == []


def test_the_checks_see_what_is_wrong() -> None:
    """A missing, duplicated, stale or thin runbook, a dangling link and a bogus command are each reported."""
    text = OPERATIONS.read_text(encoding="utf-8")
    alerts = chart_alerts()
    extending = "## Extending: a new slice or table"

    missing = text.replace('<a id="runbook-firstmileapidown"></a>', "")
    assert check_alert_runbooks(missing, alerts) == [
        'no runbook for FirstmileApiDown: add <a id="runbook-firstmileapidown"></a> and its section'
    ]
    assert "a link to #runbook-firstmileapidown leads nowhere" in check_stale_runbooks(missing, alerts)

    twice = text.replace(extending, '<a id="runbook-firstmilerelaydown"></a>\n#### FirstmileRelayDown\n\n' + extending)
    assert "runbook-firstmilerelaydown: 2 anchors with this id, expected one" in check_alert_runbooks(twice, alerts)

    thin = text.replace(extending, '<a id="runbook-firstmilegone"></a>\n#### FirstmileGone\n\nGone.\n\n' + extending)
    assert check_stale_runbooks(thin, alerts) == [
        "runbook-firstmilegone: a runbook for an alert or failure mode that does not exist"
    ]
    assert check_alert_runbooks(thin, [*alerts, "FirstmileGone"]) == [
        "runbook-firstmilegone: the runbook has 1 line(s), expected at least 3"
    ]
    assert check_alert_runbooks(text, [*alerts, "FirstmileApiDown"]) == [
        "FirstmileApiDown: defined more than once in the chart"
    ]

    no_impact = text.replace("**Impact and SLA.** Design: stale analytics", "Design: stale analytics")
    assert check_failure_runbooks(no_impact) == ["runbook-failure-clickhouse-unavailable: no **Impact and SLA.** part"]
    assert check_failure_runbooks(text, {**FAILURE_MODES, "dns": "DNS"}) == [
        'no runbook for DNS: add <a id="runbook-failure-dns"></a> and its section'
    ]

    bogus = text.replace(
        extending,
        "```bash\nkubectl -n firstmile exec deploy/firstmile-relay -- firstmile events frobnicate\n"
        "firstmile events replay-dlq --turbo   # no such option\n```\n\nand `firstmile models`.\n\n" + extending,
    )
    assert check_runbook_commands(bogus) == [
        "'firstmile events frobnicate': no command 'firstmile events frobnicate'",
        "'firstmile events replay-dlq --turbo': 'firstmile events replay-dlq' has no option --turbo",
        "'firstmile models': 'firstmile models' is a group; name its subcommand",
    ]
