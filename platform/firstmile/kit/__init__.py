"""Shared infrastructure: database, errors, auth guards, telemetry."""
