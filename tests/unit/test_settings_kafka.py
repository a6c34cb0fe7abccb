"""Kafka connection settings: SASL/SSL are whole or refused, and the password stays out of reprs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from firstmile.events.kafka import connection_config
from firstmile.settings import Settings
from firstmile.wiring.workers import stream_config

SCRAM = {
    "kafka_bootstrap_servers": "b-1.msk:9096,b-2.msk:9096",
    "kafka_security_protocol": "SASL_SSL",
    "kafka_sasl_mechanism": "SCRAM-SHA-512",
    "kafka_sasl_username": "firstmile",
    "kafka_sasl_password": "s3cret-p4ss",
}


def test_plaintext_by_default_adds_only_the_protocol() -> None:
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:9092")  # type: ignore[call-arg]
    assert settings.events.kafka_client_config() == {"security.protocol": "PLAINTEXT"}
    assert stream_config(settings).connection() == {
        "bootstrap.servers": "127.0.0.1:9092",
        "security.protocol": "PLAINTEXT",
    }


def test_sasl_ssl_with_scram_gives_librdkafka_every_property(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = Settings(**SCRAM, kafka_ssl_ca_file=ca)  # type: ignore[arg-type, call-arg]
    assert stream_config(settings).connection() == {
        "bootstrap.servers": "b-1.msk:9096,b-2.msk:9096",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "firstmile",
        "sasl.password": "s3cret-p4ss",
        "ssl.ca.location": str(ca),
    }


def test_the_password_is_not_in_the_reprs() -> None:
    settings = Settings(**SCRAM)  # type: ignore[arg-type]
    assert "s3cret-p4ss" not in repr(settings.events)
    assert "s3cret-p4ss" not in repr(stream_config(settings))


@pytest.mark.parametrize(
    ("missing", "named"),
    [
        ("kafka_sasl_mechanism", "FIRSTMILE_KAFKA_SASL_MECHANISM"),
        ("kafka_sasl_username", "FIRSTMILE_KAFKA_SASL_USERNAME"),
        ("kafka_sasl_password", "FIRSTMILE_KAFKA_SASL_PASSWORD"),
    ],
)
def test_a_sasl_protocol_without_its_credentials_is_refused_naming_what_is_missing(missing: str, named: str) -> None:
    values = {k: v for k, v in SCRAM.items() if k != missing}
    with pytest.raises(ValidationError, match=f"SASL_SSL needs {named}"):
        Settings(**values)  # type: ignore[arg-type]


def test_sasl_credentials_without_a_sasl_protocol_are_refused() -> None:
    values = SCRAM | {"kafka_security_protocol": "SSL"}
    with pytest.raises(
        ValidationError, match="FIRSTMILE_KAFKA_SASL_\\* are set but FIRSTMILE_KAFKA_SECURITY_PROTOCOL is SSL"
    ):
        Settings(**values)  # type: ignore[arg-type]


def test_a_ca_file_without_tls_and_an_unknown_protocol_are_refused() -> None:
    with pytest.raises(ValidationError, match="FIRSTMILE_KAFKA_SSL_CA_FILE needs"):
        Settings(kafka_ssl_ca_file="/etc/ssl/certs/ca-certificates.crt")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="kafka_security_protocol"):
        Settings(kafka_security_protocol="SASL_IAM")  # type: ignore[call-arg]


def test_a_connection_is_bootstrap_servers_or_properties_naming_them() -> None:
    assert connection_config("h:9092") == {"bootstrap.servers": "h:9092"}
    assert connection_config({"bootstrap.servers": "h:9092", "security.protocol": "SSL"})["security.protocol"] == "SSL"
    with pytest.raises(ValueError, match=r"bootstrap\.servers"):
        connection_config({"security.protocol": "SSL"})
