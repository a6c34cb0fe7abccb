"""docs/deployment.md must not drift from the repository.

Every make target, repository path and link, Terraform output, module and resource address, Helm
values key, ``FIRSTMILE_*`` setting and ``firstmile`` command the page names must exist. Each check
is a function returning the problems it found, so the last test can show that each one fails on a
doctored text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import click
import yaml

from tests.factories import ROOT
from tests.unit.test_readme import makefile_targets, options_named, resolve

DOC = ROOT / "docs" / "deployment.md"
CHART = ROOT / "helm" / "firstmile"
ENV = ROOT / "terraform" / "envs" / "production"
REGION_MODULE = ROOT / "terraform" / "modules" / "region"

# Files the page tells the reader to create; they are not in the repository.
CREATED = {"terraform/envs/production/backend.hcl"}

FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)


# --- reading the page -------------------------------------------------------------------------


def code_blocks(text: str) -> list[tuple[str, str]]:
    """Each fenced block as (language, body)."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    """The page without its fenced blocks."""
    return FENCE.sub("", text)


def inline_code(text: str) -> list[str]:
    """The contents of the inline code spans outside fenced blocks."""
    return re.findall(r"`([^`\n]+)`", prose(text))


def expand_aliases(text: str) -> str:
    """Replace ``$TF`` by what the page defines it as (``TF="terraform -chdir=…"``)."""
    match = re.search(r'^TF="([^"]+)"', text, flags=re.MULTILINE)
    return text.replace("$TF", match.group(1)) if match else text


def code_lines(text: str) -> list[str]:
    """The lines of every fenced block, with backslash continuations joined."""
    lines: list[str] = []
    for _, body in code_blocks(expand_aliases(text)):
        lines.extend(re.sub(r"\\\n\s*", " ", body).splitlines())
    return lines


# --- make targets -----------------------------------------------------------------------------


def check_make_targets(text: str) -> list[str]:
    named = {m.group(1) for span in inline_code(text) if (m := re.match(r"make ([a-z][a-z0-9-]*)", span))}
    named |= {m.group(1) for line in code_lines(text) if (m := re.match(r"\s*make ([a-z][a-z0-9-]*)", line))}
    return [f"`make {target}` is not a Makefile target" for target in sorted(named - makefile_targets())]


# --- repository paths and links ---------------------------------------------------------------


def top_level_dirs() -> set[str]:
    return {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}


def named_paths(text: str) -> set[str]:
    """Repository paths in inline code and in code blocks: those under a top-level folder of the repository."""
    tops = "|".join(sorted(top_level_dirs()))
    found: set[str] = set()
    for span in inline_code(text):
        token = span.strip()
        if re.fullmatch(rf"(?:{tops})/[\w./*-]*", token) or (ROOT / token).is_file():
            found.add(token)
    for line in code_lines(text):
        found.update(re.findall(rf"(?<![\w./$-])((?:{tops})/[\w./*-]*[\w*])", line))
    return found


def path_problems(paths: set[str]) -> list[str]:
    problems = []
    for path in sorted(paths - CREATED):
        exists = any(ROOT.glob(path)) if "*" in path else (ROOT / path.rstrip("/")).exists()
        if not exists:
            problems.append(f"{path}: no such file or folder in the repository")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]{2,}|`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(markdown), flags=re.MULTILINE):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def link_problems(text: str, page: Path = DOC) -> list[str]:
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            problems.append(f"link {target}: no such file")
            continue
        if anchor and path.suffix == ".md":
            headings = anchors(text if path == page else path.read_text(encoding="utf-8"))
            if anchor not in headings:
                problems.append(f"link {target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    return problems


def check_paths(text: str) -> list[str]:
    return path_problems(named_paths(text)) + link_problems(text)


# --- Terraform --------------------------------------------------------------------------------


def hcl_block(path: Path, header: str) -> str:
    """The body of the block starting with ``header`` (up to its closing brace at column 0)."""
    source = path.read_text(encoding="utf-8")
    start = source.index(header)
    return source[start : source.index("\n}\n", start)]


def root_outputs() -> set[str]:
    return set(re.findall(r'^output "([^"]+)"', (ENV / "outputs.tf").read_text(encoding="utf-8"), re.MULTILINE))


def regions_fields() -> dict[str, set[str] | None]:
    """The fields of the ``regions`` output; for the maps among them, their keys (None: not checked)."""
    regions = hcl_block(ENV / "outputs.tf", 'output "regions"')
    names = re.findall(r"^\s+(\w+)\s+= m\.region\.", regions, re.MULTILINE)
    fields: dict[str, set[str] | None] = dict.fromkeys(names)
    workloads = hcl_block(REGION_MODULE / "variables.tf", 'variable "service_accounts"')
    fields["workload_role_arns"] = set(re.findall(r"^\s+(\w+)\s+= optional\(string", workloads, re.MULTILINE))
    urls = hcl_block(REGION_MODULE / "outputs.tf", 'output "api_urls"')
    fields["api_urls"] = set(re.findall(r"^\s+(\w+)\s+= \"https://", urls, re.MULTILINE))
    return fields


def supported_regions() -> set[str]:
    match = re.search(r"supported_regions\s*=\s*\[([^\]]*)\]", (ENV / "providers.tf").read_text(encoding="utf-8"))
    assert match is not None
    return set(re.findall(r'"([^"]+)"', match.group(1)))


def field_problems(region: str | None, dotted: str) -> list[str]:
    problems = []
    if region is not None and region not in supported_regions():
        problems.append(f'."{region}": not a region of terraform/envs/production')
    fields = regions_fields()
    name, _, sub = dotted.partition(".")
    if name not in fields:
        problems.append(f"{dotted}: the regions output has no field {name}")
    elif sub:
        keys = fields[name]
        if keys is not None and sub.split(".")[0] not in keys:
            problems.append(f"{dotted}: {name} has no key {sub}")
    return problems


def mapping_table_fields(text: str) -> list[str]:
    """The first column of the table headed "`regions` output field"."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| `regions` output field"))
    cells = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells.extend(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return cells


def modules_of(directory: Path) -> dict[str, Path]:
    """The module blocks of a Terraform directory, by name, with the directory each one sources."""
    found = {}
    for tf in directory.glob("*.tf"):
        for name, source in re.findall(
            r'^module "([^"]+)"\s*\{[^}]*?source\s*=\s*"([^"]+)"',
            tf.read_text(encoding="utf-8"),
            re.MULTILINE | re.DOTALL,
        ):
            found[name] = (directory / source).resolve()
    return found


def resources_of(directory: Path) -> set[tuple[str, str]]:
    found = set()
    for tf in directory.glob("*.tf"):
        found.update(re.findall(r'^resource "([^"]+)" "([^"]+)"', tf.read_text(encoding="utf-8"), re.MULTILINE))
    return found


ADDRESS = re.compile(
    r'module\.[a-z0-9_]+(?:\["[^"]+"\])?(?:\.module\.[a-z0-9_]+(?:\["[^"]+"\])?)*(?:\.aws_[a-z0-9_]+\.[a-z][a-z0-9_]*)?'
)


def address_problems(address: str) -> list[str]:
    """A module address (``module.a["k"].module.b``, optionally ending in a resource) must exist."""
    directory = ENV
    parts = re.findall(r'module\.([a-z0-9_]+)(?:\["([^"]+)"\])?', address)
    for name, key in parts:
        modules = modules_of(directory)
        if name not in modules:
            return [f"{address}: no module {name} in {directory.relative_to(ROOT)}"]
        if key and name.startswith("region_") and key.replace("-", "_") != name.removeprefix("region_"):
            return [f"{address}: module {name} deploys its own region, not {key}"]
        directory = modules[name]
    resource = re.search(r"\.(aws_[a-z0-9_]+)\.([a-z][a-z0-9_]*)$", address)
    if resource and (resource.group(1), resource.group(2)) not in resources_of(directory):
        return [f"{address}: no resource {resource.group(1)}.{resource.group(2)} in {directory.relative_to(ROOT)}"]
    return []


def check_terraform(text: str) -> list[str]:
    problems = []
    code = "\n".join(code_lines(text))
    for chdir, name in re.findall(r"terraform\s+-chdir=(\S+)\s+output\s+(?:-\w+\s+)*([a-z_][a-z0-9_]*)", code):
        if chdir != "terraform/envs/production":
            problems.append(f"terraform -chdir={chdir} output: the outputs are those of terraform/envs/production")
        if name not in root_outputs():
            problems.append(f"terraform output {name}: no such output in terraform/envs/production/outputs.tf")
    for region, fields in re.findall(r'\."([a-z]{2}-[a-z]+-\d)"((?:\.[a-z_]+)+)', code):
        problems.extend(field_problems(region, fields.lstrip(".")))
    for region, names in re.findall(r'\."([a-z]{2}-[a-z]+-\d)"\s*\|\s*\{([^}]*)\}', code):
        for name in names.split(","):
            problems.extend(field_problems(region, name.strip()))
    for cell in mapping_table_fields(text):
        problems.extend(field_problems(None, cell))
    for span in inline_code(text):
        if re.fullmatch(r"[a-z_]+\.[a-z_]+", span) and span.split(".")[0] in regions_fields():
            problems.extend(field_problems(None, span))
    unescaped = re.sub(r"\\([.\[\]])", r"\1", text)
    for address in sorted(set(ADDRESS.findall(unescaped))):
        problems.extend(address_problems(address))
    return problems


def object_attributes(variable: str) -> set[str] | None:
    """The first-level attributes of a region-module variable typed ``object({…})`` (None: not an object)."""
    block = hcl_block(REGION_MODULE / "variables.tf", f'variable "{variable}"')
    match = re.search(r"^  type\s+= object\(\{\n(.*?)^  \}\)", block, re.MULTILINE | re.DOTALL)
    return set(re.findall(r"^    (\w+)\s+= ", match.group(1), re.MULTILINE)) if match else None


def check_module_variables(text: str) -> list[str]:
    """Inline ``eks.admin_principal_arns``-style names of the region module's object variables."""
    source = (REGION_MODULE / "variables.tf").read_text(encoding="utf-8")
    variables = set(re.findall(r'^variable "([a-z_]+)"', source, re.MULTILINE))
    problems = []
    for span in inline_code(text):
        match = re.fullmatch(r"([a-z_]+)\.([a-z_]+)", span)
        if match and match.group(1) in variables:
            attributes = object_attributes(match.group(1))
            if attributes is not None and match.group(2) not in attributes:
                problems.append(
                    f"{span}: variable {match.group(1)} of the region module has no attribute {match.group(2)}"
                )
    return problems


# --- Helm values and settings -----------------------------------------------------------------


@cache
def values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    return loaded


@cache
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    return loaded


@cache
def documented_settings() -> frozenset[str]:
    table = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    return frozenset(re.findall(r"^\| `(FIRSTMILE_[A-Z0-9_]+)`", table, re.MULTILINE))


def deref(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema()["definitions"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def config_problem(key: str) -> str | None:
    refused = deref(schema()["properties"]["config"])["properties"].get(key, {})
    if "not" in refused:
        return f"config.{key}: {refused.get('description', 'refused by the schema')}"
    if key not in documented_settings():
        return f"config.{key}: not a setting of docs/configuration.md"
    return None


def values_path_problem(path: list[str]) -> str | None:
    """Why ``path`` is not a key of the chart's values (None: it is, or it lies inside an open map)."""
    node_s: dict[str, Any] = schema()
    node_v: Any = values()
    for depth, key in enumerate(path):
        if depth == 1 and path[0] == "config":
            return config_problem(key)
        node_s = deref(node_s)
        properties = node_s.get("properties", {})
        if key in properties:
            if isinstance(node_v, dict) and node_v and key not in node_v:
                return f"{'.'.join(path)}: {key} is in the schema but not in values.yaml"
            node_s = properties[key]
            node_v = node_v.get(key) if isinstance(node_v, dict) else None
            if deref(node_s).get("type") == "array":
                return None
        elif node_s.get("additionalProperties", True) is not False:
            return None  # a map with keys of the user's choosing (labels, annotations, files)
        else:
            return f"{'.'.join(path)}: no key {key} in helm/firstmile/values.yaml"
    return None


def leaf_paths(node: Any, prefix: tuple[str, ...] = ()) -> Iterator[list[str]]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaf_paths(value, (*prefix, str(key)))
    else:
        yield list(prefix)


def values_paths(text: str) -> list[list[str]]:
    """Values keys the page names: its yaml blocks, `--set` of helm/firstmile, inline `a.b.c` spans."""
    paths: list[list[str]] = []
    for language, body in code_blocks(text):
        if language == "yaml":
            paths.extend(leaf_paths(yaml.safe_load(body)))
    for line in code_lines(text):
        if "helm/firstmile" in line:
            for key in re.findall(r"--set(?:-string)?[= ]((?:[^=\s\\]|\\.)+)=", line):
                paths.append([part.replace("\\.", ".") for part in re.split(r"(?<!\\)\.", key)])
    for span in inline_code(text):
        match = re.fullmatch(r"([a-z][A-Za-z0-9]*(?:\.[A-Za-z0-9_/-]+)+)(?:: .+)?", span)
        if match and match.group(1).split(".")[0] in values():
            paths.append(match.group(1).split("."))
    return paths


def check_values(text: str) -> list[str]:
    return [problem for path in values_paths(text) if (problem := values_path_problem(path)) is not None]


def check_settings(text: str) -> list[str]:
    """Every FIRSTMILE_* name the page uses is a setting."""
    named = set(re.findall(r"\bFIRSTMILE_[A-Z0-9_]*[A-Z0-9]\b", text))
    return [f"{name}: not a setting of docs/configuration.md" for name in sorted(named - documented_settings())]


# --- firstmile commands -----------------------------------------------------------------------

COMMAND = re.compile(
    r"(?:^\s*|\s--\s+|\$\(\s*|\|\s*|&&\s*|;\s*)"  # where a command starts
    r"(?:\$[A-Z_]+\s+)?"  # $FM: kubectl … exec -i <pod> --
    r"(?:env\s+(?:-u\s+\S+\s+|[A-Z_]+=\S*\s+)*)?"
    r"(?:\.venv/bin/)?firstmile(?=\s|$)((?:\s+[^\s|;&)`#]+)*)"
)


INLINE_COMMAND = re.compile(r"(?:\$[A-Z_]+\s+)?(?:env\s+(?:-u\s+\S+\s+|[A-Z_]+=\S*\s+)*)?firstmile(\s+\S.*)")


def firstmile_commands(text: str) -> list[str]:
    """The ``firstmile …`` command lines of the code blocks and inline spans (a bare `firstmile` is the release)."""
    rows = ["firstmile" + m.group(1) for line in code_lines(text) for m in COMMAND.finditer(line)]
    rows.extend("firstmile" + m.group(1) for span in inline_code(text) if (m := INLINE_COMMAND.fullmatch(span)))
    return [row for row in rows if row != "firstmile"]


def check_commands(text: str) -> list[str]:
    problems = []
    for row in firstmile_commands(text):
        resolved = resolve(row)
        for path, command in resolved:
            if command is None:
                problems.append(f"{row!r}: no command {path!r}")
            elif isinstance(command, click.Group):
                problems.append(f"{row!r}: {path!r} is a group, not a command")
            elif len(resolved) == 1:
                known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
                problems.extend(
                    f"{row!r}: {path!r} has no option {opt}" for opt in options_named(row) if opt not in known
                )
    return problems


# --- tests ------------------------------------------------------------------------------------


def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def test_every_make_target_exists() -> None:
    assert check_make_targets(doc()) == []


def test_every_repository_path_and_link_exists() -> None:
    assert check_paths(doc()) == []


def test_every_terraform_output_module_and_resource_exists() -> None:
    assert check_terraform(doc()) == []
    assert check_module_variables(doc()) == []


def test_every_values_key_and_setting_exists() -> None:
    assert check_values(doc()) == []
    assert check_settings(doc()) == []


def test_every_firstmile_command_exists() -> None:
    assert check_commands(doc()) == []


def test_the_checks_see_the_page() -> None:
    """The extractors find what the page holds, so an empty result above means something."""
    text = doc()
    assert len(firstmile_commands(text)) >= 15
    assert len(values_paths(text)) >= 40
    assert len(named_paths(text)) >= 15
    assert len(mapping_table_fields(text)) >= 10
    assert len(set(ADDRESS.findall(re.sub(r"\\([.\[\]])", r"\1", text)))) >= 4
    assert len(re.findall(r"terraform\s+-chdir=\S+\s+output", "\n".join(code_lines(text)))) >= 8


def test_the_checks_fail_on_a_doctored_page() -> None:
    text = doc()
    assert check_make_targets(text + "\nRun `make frobnicate`.\n") == ["`make frobnicate` is not a Makefile target"]

    assert path_problems(named_paths(text + "\nSee `helm/firstmile/examples/values-mars-1.yaml`.\n")) == [
        "helm/firstmile/examples/values-mars-1.yaml: no such file or folder in the repository"
    ]
    in_code = text + "\n```bash\nhelm lint helm/firstmile -f helm/firstmile/ci/nope-values.yaml\n```\n"
    assert path_problems(named_paths(in_code)) == [
        "helm/firstmile/ci/nope-values.yaml: no such file or folder in the repository"
    ]
    assert link_problems(text + "\n[x](../helm/NOPE.md)\n") == ["link ../helm/NOPE.md: no such file"]
    assert link_problems(text + "\n[x](../helm/README.md#nope)\n") == [
        "link ../helm/README.md#nope: no heading #nope in helm/README.md"
    ]
    assert link_problems(text + "\n[x](#11-nope)\n") == ["link #11-nope: no heading #11-nope in docs/deployment.md"]

    wrong_output = text + "\n```bash\n$TF output -raw zone_idd\n```\n"
    assert "terraform output zone_idd: no such output in terraform/envs/production/outputs.tf" in check_terraform(
        wrong_output
    )
    wrong_field = text + "\n```bash\n$TF output -json regions | jq -r '.\"eu-west-1\".cluster_nam'\n```\n"
    assert "cluster_nam: the regions output has no field cluster_nam" in check_terraform(wrong_field)
    wrong_role = text + "\n```bash\n$TF output -json regions | jq -r '.\"eu-west-1\".workload_role_arns.apii'\n```\n"
    assert "workload_role_arns.apii: workload_role_arns has no key apii" in check_terraform(wrong_role)
    assert '."eu-mars-1": not a region of terraform/envs/production' in check_terraform(
        text + "\n```bash\njq '.\"eu-mars-1\".cluster_name'\n```\n"
    )
    assert "api_urls.regoin: api_urls has no key regoin" in check_terraform(text + "\nSee `api_urls.regoin`.\n")
    wrong_table = text.replace("| `cluster_name` |", "| `cluster_nme` |")
    assert "cluster_nme: the regions output has no field cluster_nme" in check_terraform(wrong_table)
    assert "module.region_mars_1: no module region_mars_1 in terraform/envs/production" in check_terraform(
        text + "\nPlan `module.region_mars_1`.\n"
    )
    assert 'module.region_eu_west_1["us-east-1"]: module region_eu_west_1 deploys its own region, not us-east-1' in (
        check_terraform(text + '\nPlan `module.region_eu_west_1["us-east-1"]`.\n')
    )
    bucket = 'module.region_us_east_1["us-east-1"].module.region.aws_s3_bucket.audt'
    assert f"{bucket}: no resource aws_s3_bucket.audt in terraform/modules/region" in check_terraform(
        text + f"\n`{bucket}`\n"
    )
    assert check_module_variables(text + "\nSet `eks.admin_principals`.\n") == [
        "eks.admin_principals: variable eks of the region module has no attribute admin_principals"
    ]

    set_typo = text + "\n```bash\nhelm upgrade --install firstmile helm/firstmile --set api.replicaCountTypo=3\n```\n"
    assert check_values(set_typo) == ["api.replicaCountTypo: no key replicaCountTypo in helm/firstmile/values.yaml"]
    yaml_typo = text + "\n```yaml\napi:\n  serviceAcount:\n    irsaRoleArn: arn\n```\n"
    assert check_values(yaml_typo) == [
        "api.serviceAcount.irsaRoleArn: no key serviceAcount in helm/firstmile/values.yaml"
    ]
    assert check_values(text + "\nSet `inference.gpu.nodeSelectr`.\n") == [
        "inference.gpu.nodeSelectr: no key nodeSelectr in helm/firstmile/values.yaml"
    ]
    secret_in_values = text + "\n```yaml\nconfig:\n  FIRSTMILE_DATABASE_URL: postgresql://x\n```\n"
    assert check_values(secret_in_values) == [
        "config.FIRSTMILE_DATABASE_URL: FIRSTMILE_DATABASE_URL is a secret: it comes from secrets.existingSecret "
        "or Vault, never from values."
    ]
    assert check_values(text + "\n```yaml\nconfig:\n  FIRSTMILE_NOT_A_SETTING: x\n```\n") == [
        "config.FIRSTMILE_NOT_A_SETTING: not a setting of docs/configuration.md"
    ]
    assert check_settings(text + "\nFIRSTMILE_NOT_A_SETTING=1\n") == [
        "FIRSTMILE_NOT_A_SETTING: not a setting of docs/configuration.md"
    ]

    bogus = (
        text
        + "\n```bash\n$FM firstmile tenants frobnicate /tmp/x\n$FM firstmile keys create --tenant demo --turbo\n```\n"
    )
    problems = check_commands(bogus)
    assert any("no command 'firstmile tenants frobnicate'" in p for p in problems)
    assert any("'firstmile keys create' has no option --turbo" in p for p in problems)
    assert check_commands(text + "\nRun `firstmile tenants`.\n") == [
        "'firstmile tenants': 'firstmile tenants' is a group, not a command"
    ]
