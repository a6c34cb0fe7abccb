"""Every secret setting is refused in the chart's `config` values: it comes from the existing Secret or Vault."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, SecretStr

from firstmile.settings import Settings
from tests.factories import ROOT

SCHEMA = ROOT / "helm" / "firstmile" / "values.schema.json"


def secret_settings() -> set[str]:
    """FIRSTMILE_* names of the settings typed SecretStr, in every section."""
    names: set[str] = set()
    for field in Settings.model_fields.values():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            for inner in section.model_fields.values():
                if SecretStr in (getattr(inner.annotation, "__args__", None) or (inner.annotation,)):
                    names.add(f"FIRSTMILE_{str(inner.validation_alias).upper()}")
    return names


def refused(schema: dict[str, Any]) -> set[str]:
    config = schema["properties"]["config"]["properties"]
    return {name for name, rule in config.items() if rule.get("not") == {}}


def test_the_schema_refuses_every_secret_setting_in_config() -> None:
    secrets = secret_settings()
    assert "FIRSTMILE_KAFKA_SASL_PASSWORD" in secrets and "FIRSTMILE_DATABASE_URL" in secrets
    missing = secrets - refused(json.loads(SCHEMA.read_text()))
    assert not missing, f"values.schema.json lets these secrets into config: {sorted(missing)}"


def test_the_check_sees_a_secret_the_schema_lets_through() -> None:
    schema = json.loads(SCHEMA.read_text())
    del schema["properties"]["config"]["properties"]["FIRSTMILE_KAFKA_SASL_PASSWORD"]
    assert "FIRSTMILE_KAFKA_SASL_PASSWORD" in secret_settings() - refused(schema)
