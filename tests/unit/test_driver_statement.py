"""``DriverStatement``: the request path's statements written with names and sent positionally on the driver."""

from __future__ import annotations

import asyncpg
import pytest

from firstmile.kit.db import DriverStatement, is_transient


def test_names_become_positions_and_a_repeated_name_is_one_parameter() -> None:
    s = DriverStatement.of("INSERT INTO t (a, b, c) VALUES (:tid, CAST(:doc AS jsonb), :tid) RETURNING a::text")
    assert s.sql == "INSERT INTO t (a, b, c) VALUES ($1, CAST($2 AS jsonb), $1) RETURNING a::text"
    assert s.names == ("tid", "doc")
    assert s.arguments({"doc": "{}", "tid": 7, "unused": 1}) == [7, "{}"]


def test_a_missing_parameter_is_named() -> None:
    with pytest.raises(KeyError, match="doc"):
        DriverStatement.of("SELECT :tid, :doc").arguments({"tid": 1})


def test_server_errors_from_the_driver_are_retried_by_their_sqlstate() -> None:
    assert is_transient(asyncpg.SerializationError("could not serialize access"))
    assert is_transient(asyncpg.DeadlockDetectedError("deadlock detected"))
    assert not is_transient(asyncpg.InsufficientPrivilegeError("new row violates row-level security policy"))
    assert not is_transient(asyncpg.UniqueViolationError("duplicate key"))
