"""The README must not drift from the code: its command table, its make targets, its documentation list."""

from __future__ import annotations

import re
from pathlib import Path

import click

from firstmile.cli import main
from tests.factories import ROOT

README = ROOT / "README.md"


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of a markdown text (up to the next ``## ``)."""
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def table_commands(text: str) -> list[str]:
    """The first cell of each row of the README's command table, unescaped (``\\|`` is ``|``)."""
    rows = []
    for line in section(text, "The `firstmile` command").splitlines():
        match = re.match(r"\|\s*`(firstmile[^`]*)`\s*\|", line)
        if match:
            rows.append(match.group(1).replace("\\|", "|"))
    return rows


def resolve(row: str) -> list[tuple[str, click.Command | None]]:
    """Each command a row names, by its path, with the click command (``None`` when it does not exist).

    The words after ``firstmile`` are walked down the groups of :data:`firstmile.cli.main`: inside a
    group the next word must be a subcommand (``a|b|c`` names several, each checked); the first
    command that is not a group ends the walk, and the rest of the row is its arguments.
    """
    words = row.split()[1:]
    found: list[tuple[str, click.Command | None]] = []
    frontier: list[tuple[str, click.Command]] = [("firstmile", main)]
    for word in words:
        groups = [(path, cmd) for path, cmd in frontier if isinstance(cmd, click.Group)]
        if not groups:
            break
        next_frontier: list[tuple[str, click.Command]] = []
        for path, group in groups:
            assert isinstance(group, click.Group)
            for name in word.split("|"):
                sub = group.commands.get(name)
                if sub is None:
                    found.append((f"{path} {name}", None))
                else:
                    next_frontier.append((f"{path} {name}", sub))
        frontier = next_frontier
    found.extend((path, cmd) for path, cmd in frontier)
    return found


def options_named(row: str) -> list[str]:
    """The options a row shows (``--port``, ``-o``), without their values."""
    return re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", row)


def cli_commands() -> set[str]:
    """Every leaf command of the CLI by its path, e.g. ``firstmile tenants apply``."""
    leaves: set[str] = set()

    def walk(path: str, command: click.Command) -> None:
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(f"{path} {name}", sub)
        else:
            leaves.add(path)

    walk("firstmile", main)
    return leaves


def check_command_table(text: str) -> list[str]:
    """What is wrong with the command table: commands or options that do not exist, commands left out."""
    problems: list[str] = []
    documented: set[str] = set()
    for row in table_commands(text):
        resolved = resolve(row)
        for path, command in resolved:
            if command is None:
                problems.append(f"{row!r}: no command {path!r}")
                continue
            if isinstance(command, click.Group):
                problems.append(f"{row!r}: {path!r} is a group; name its subcommands")
                continue
            documented.add(path)
            if len(resolved) == 1:  # a row of alternatives shows no options
                known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
                problems.extend(
                    f"{row!r}: {path!r} has no option {opt}" for opt in options_named(row) if opt not in known
                )
    problems.extend(f"the table leaves out {path!r}" for path in sorted(cli_commands() - documented))
    return problems


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    # A rule may name several targets (`a b c: deps`); `:=` is an assignment, not a rule.
    rules = re.findall(r"^([a-z][a-z0-9 -]*):(?!=)", text, flags=re.MULTILINE)
    return {target for rule in rules for target in rule.split()}


def documented_makefile_targets() -> set[str]:
    """The targets ``make help`` lists (those with a ``## `` description)."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-z][a-z0-9-]*):.*## ", text, flags=re.MULTILINE))


def check_make_targets(text: str) -> list[str]:
    """Targets the README names as `` `make X` `` that the Makefile lacks; targets of ``make help`` it omits."""
    named = set(re.findall(r"`make ([a-z][a-z0-9-]*)`", text))
    problems = [f"`make {target}` is not a Makefile target" for target in sorted(named - makefile_targets())]
    problems.extend(
        f"the README does not name `make {target}`" for target in sorted(documented_makefile_targets() - named)
    )
    return problems


def check_documentation_list(text: str, docs: Path) -> list[str]:
    """Files of docs/ the Documentation list does not link, and links in it that lead nowhere."""
    links = set(re.findall(r"\]\(([^)#\s]+)\)", section(text, "Documentation")))
    normalised = {link.rstrip("/") for link in links}
    generated = {"benchmarks-latest.md"}  # make bench's report: git-ignored, not documentation
    expected = {f"docs/{path.name}" for path in docs.glob("*.md") if path.name not in generated}
    expected.update(f"docs/{path.name}" for path in docs.iterdir() if path.is_dir())
    problems = [f"the Documentation list does not link {path}" for path in sorted(expected - normalised)]
    problems.extend(
        f"the Documentation list links {link}, which does not exist"
        for link in sorted(normalised)
        if not (docs.parent / link).exists()
    )
    return problems


def test_every_command_in_the_table_exists_and_every_command_is_in_it() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(table_commands(text)) > 10, "the command table was not found"
    assert check_command_table(text) == []


def test_every_make_target_named_exists() -> None:
    assert check_make_targets(README.read_text(encoding="utf-8")) == []


def test_every_doc_is_linked_from_the_documentation_list() -> None:
    assert check_documentation_list(README.read_text(encoding="utf-8"), ROOT / "docs") == []


def test_the_checks_see_what_is_wrong() -> None:
    """Each check finds a bogus row, a bogus option, a missing command, a bogus target and a missing link."""
    text = README.read_text(encoding="utf-8")
    table_end = text.index("| `firstmile sso sync-events` |")
    bogus = (
        text[:table_end]
        + "| `firstmile tenants frobnicate` | no such command |\n"
        + "| `firstmile models train\\|bake` | one alternative does not exist |\n"
        + "| `firstmile serve --turbo` | no such option |\n"
        + text[text.index("\n", table_end) + 1 :]
    )
    problems = check_command_table(bogus)
    assert any("no command 'firstmile tenants frobnicate'" in p for p in problems)
    assert any("no command 'firstmile models bake'" in p for p in problems)
    assert any("has no option --turbo" in p for p in problems)
    assert any("leaves out 'firstmile sso sync-events'" in p for p in problems)
    assert check_make_targets(text + "\nrun `make frobnicate`\n") == ["`make frobnicate` is not a Makefile target"]
    unlinked = text.replace("- [docs/features.md](docs/features.md)", "- features")
    assert check_documentation_list(unlinked, ROOT / "docs") == [
        "the Documentation list does not link docs/features.md"
    ]
