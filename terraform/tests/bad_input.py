#!/usr/bin/env python3
"""Bad input fails with the message its variable declares.

The `terraform test` runs that carry `expect_failures = [var.X]` prove that a bad value fails
on the variable meant, but Terraform hides the diagnostics of an expected failure, and a test
cannot assert on text. This check re-runs exactly those runs without `expect_failures`, each
alone in a test file of a scratch test directory (Terraform skips the rest of a file after a
failed run), and requires each to fail showing one of the `error_message`s declared in
`variable "X"` (whitespace folded: Terraform wraps long messages). Where X declares several
validations, a `# fails with: <words>` comment in the run names the one meant, and the message
shown must be that one.

Usage: bad_input.py DIR...  (each DIR a module or environment, already `terraform init`-ed)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = re.compile(r'^run "(?P<name>[^"]+)" \{\n(?P<body>.*?)^\}\n', re.M | re.S)
EXPECT = re.compile(r"^\s*expect_failures\s*=\s*\[var\.(?P<var>[a-z0-9_]+)\]\s*\n", re.M)
HINT = re.compile(r"^\s*# fails with: (?P<hint>.+?)\s*$", re.M)
MESSAGE_START = re.compile(r'error_message\s*=\s*"')
FILE = re.compile(r"^(?P<file>\S+)\.tftest\.hcl\.\.\. in progress$", re.M)
RESULT = re.compile(r'^\s*run "(?P<name>[^"]+)"\.\.\. (?P<status>pass|fail|skip)', re.M)


def fold(text: str) -> str:
    return " ".join(text.split())


def template(source: str, start: int) -> tuple[list[str], int]:
    """The parts of the HCL quoted template that opens at source[start - 1], and its end.

    Literal parts are unescaped strings; an interpolation `${...}` (which may hold quoted strings
    and braces of its own) is None, standing for whatever it evaluates to.
    """
    parts: list[str] = [""]
    i = start
    while source[i] != '"':
        if source.startswith("${", i):
            depth, i, quoted = 1, i + 2, False
            while depth:
                c = source[i]
                if quoted:
                    quoted = c != '"' or source[i - 1] == "\\"
                elif c == '"':
                    quoted = True
                elif c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                i += 1
            parts += [None, ""]  # type: ignore[list-item]
        elif source[i] == "\\":
            parts[-1] += bytes(source[i: i + 2], "utf-8").decode("unicode_escape")
            i += 2
        else:
            parts[-1] += source[i]
            i += 1
    return parts, i + 1


def pattern(parts: list[str]) -> re.Pattern[str]:
    """A regex matching the message, interpolations matching any text, whitespace folded."""
    return re.compile("".join(".+?" if p is None else re.escape(fold(p)) for p in parts))


def declared_messages(directory: Path, variable: str) -> list[tuple[str, re.Pattern[str]]]:
    """(source text, pattern) of the error message of each validation of `variable "<variable>"`."""
    source = "\n".join(p.read_text() for p in sorted(directory.glob("*.tf")))
    start = re.search(rf'^variable "{variable}" \{{', source, re.M)
    if start is None:
        raise SystemExit(f"{directory}: no variable {variable!r}")
    end = re.search(r'^(variable|output|resource|data|module|locals|provider) ', source[start.end():], re.M)
    block = source[start.end(): start.end() + end.start()] if end else source[start.end():]
    messages = []
    for m in MESSAGE_START.finditer(block):
        parts, stop = template(block, m.end())
        messages.append((fold(block[m.end(): stop - 1]), pattern(parts)))
    if not messages:
        raise SystemExit(f"{directory}: variable {variable!r} declares no validation")
    return messages


def check(directory: Path) -> bool:
    cases: dict[str, tuple[str, re.Pattern[str]]] = {}  # run name -> the message it must show
    scratch = Path(tempfile.mkdtemp(prefix=".bad-input-", dir=directory))
    try:
        for test_file in sorted((directory / "tests").glob("*.tftest.hcl")):
            text = test_file.read_text()
            first_run = RUN.search(text)
            header = text[: first_run.start()] if first_run else text
            for run in RUN.finditer(text):
                expect = EXPECT.search(run["body"])
                if expect is None:
                    continue
                messages = declared_messages(directory, expect["var"])
                hint = HINT.search(run["body"])
                if hint is not None:
                    messages = [m for m in messages if fold(hint["hint"]) in m[0]]
                if len(messages) != 1:
                    raise SystemExit(
                        f'{directory}: run "{run["name"]}" must name, with "# fails with: <words>", exactly one '
                        f'of the messages of var.{expect["var"]}; it matches {len(messages)}'
                    )
                cases[run["name"]] = messages[0]
                body = EXPECT.sub("", run["body"])
                (scratch / f'{run["name"]}.tftest.hcl').write_text(f'{header}run "{run["name"]}" {{\n{body}}}\n')
        if not cases:
            print(f"FAIL  {directory}: no expect_failures runs found")
            return False

        env = dict(os.environ, TF_IN_AUTOMATION="1")
        completed = subprocess.run(
            ["terraform", "test", "-no-color", f"-test-directory={scratch.name}"],
            cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False,
        )
        output = completed.stdout
    finally:
        shutil.rmtree(scratch)

    # Each case is a file of its own; its run's status and diagnostics come before the next file.
    files = list(FILE.finditer(output))
    ok = True
    for name, (message, expected) in cases.items():
        starts = [f for f in files if Path(f["file"]).name == name]
        if len(starts) != 1:
            print(f"FAIL  {directory} {name}: no output for it:\n{output}")
            ok = False
            continue
        index = files.index(starts[0])
        section = output[starts[0].end(): files[index + 1].start() if index + 1 < len(files) else len(output)]
        status = RESULT.search(section)
        if status is None or status["status"] != "fail":
            print(f"FAIL  {directory} {name}: expected the run to fail, got {status['status'] if status else 'no result'}")
            ok = False
        elif expected.search(fold(section)):
            print(f"ok    {directory} {name}: {expected.search(fold(section)).group(0)}")
        else:
            print(f"FAIL  {directory} {name}: the message {message!r} is not in:\n{section}")
            ok = False
    return ok


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    results = [check(Path(d).resolve()) for d in argv]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
