"""Where a tenant's model trains: the Ray address is checked the same way by the setting and by ``--ray`` (no
credentials, no scheme but ray://), an empty setting means in process, and what a run records carries no secret.
The training itself on a real Ray cluster is tests/integration/test_tenant_training_ray.py."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from firstmile.cli import main
from firstmile.ml.tenant_models import RayTraining, where_trained
from firstmile.settings import ModelSettings, Settings
from firstmile_inference.ray_train import ADDRESS_PATTERN, check_address

GOOD = ["ray://firstmile-inference-head-svc:10001", "127.0.0.1:64100", "ray://10.0.3.7:10001", "[::1]:6379"]
BAD = [
    "ray://user:secret@head:10001",  # credentials: a token goes in RAY_AUTH_TOKEN
    "http://head:10001",
    "head",
    "ray://head",
    "head:10001/path",
    "head:99999",
    "auto",
    "",
]


@pytest.mark.parametrize("address", GOOD)
def test_an_address_is_ray_client_or_a_gcs(address: str) -> None:
    assert check_address(f" {address} ") == address
    assert Settings(training_ray_address=address).models.training_ray_address == address  # type: ignore[call-arg]


@pytest.mark.parametrize("address", BAD)
def test_anything_else_is_refused_by_both(address: str) -> None:
    with pytest.raises(ValueError, match=r"Ray address|out of range"):
        check_address(address)
    if address:
        with pytest.raises(ValidationError, match="training_ray_address"):
            Settings(training_ray_address=address)  # type: ignore[call-arg]


def test_the_setting_and_the_driver_share_one_pattern() -> None:
    field = ModelSettings.model_fields["training_ray_address"]
    patterns = [getattr(m, "pattern", None) for m in field.metadata]
    assert ADDRESS_PATTERN in patterns


def test_unset_or_empty_trains_in_process() -> None:
    assert Settings().models.training_ray_address is None
    assert Settings(training_ray_address="  ").models.training_ray_address is None  # type: ignore[call-arg]
    assert Settings().models.training_ray_timeout_seconds == 3600
    with pytest.raises(ValidationError):
        Settings(training_ray_timeout_seconds=0)  # type: ignore[call-arg]


def test_a_run_records_where_it_trained() -> None:
    assert where_trained(None) == {"trained_on": "in_process", "ray_address": None}
    assert where_trained(RayTraining("ray://head:10001")) == {"trained_on": "ray", "ray_address": "ray://head:10001"}


def test_ray_options_need_a_tenant() -> None:
    result = CliRunner().invoke(main, ["models", "train", "--ray", "127.0.0.1:64100"])
    assert result.exit_code == 2 and "need --tenant" in result.output
    result = CliRunner().invoke(main, ["models", "train", "--in-process"])
    assert result.exit_code == 2 and "need --tenant" in result.output
