"""Logs, metrics and traces.

* Logs are JSON lines with the request id and tenant of the request that wrote
  them (context variables set by :class:`firstmile.app.RequestContextMiddleware`).
* Metrics are Prometheus instruments scraped at ``/metrics``. With several
  worker processes, ``PROMETHEUS_MULTIPROC_DIR`` is set by ``firstmile serve``
  and the scrape aggregates all workers.
* Traces use the OpenTelemetry SDK; the exporter is chosen by settings.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
tenant_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("tenant", default=None)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

API_LATENCY = Histogram(
    "firstmile_api_request_duration_seconds",
    "API request latency by route template, method and status.",
    ["method", "route", "status"],
    buckets=_LATENCY_BUCKETS,
)
PATH_SELECTION_LATENCY = Histogram(
    "firstmile_path_selection_duration_seconds",
    "Time the path planner took to decide, by how it decided.",
    ["selected_by"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
)
ONBOARDING_STARTS = Counter(
    "firstmile_onboarding_starts_total",
    "Onboardings started, by how the path was chosen.",
    ["selected_by"],
)
STEP_COMPLETIONS = Counter("firstmile_step_completions_total", "Steps completed (first completion only).")
ACTIVATIONS = Counter("firstmile_activations_total", "Users who completed their path's activation step.")
DB_RETRIES = Counter("firstmile_db_retries_total", "Units of work retried after a transient database failure.")
EVENTS_INGESTED = Counter("firstmile_events_ingested_total", "Segment messages ingested, by outcome.", ["outcome"])
EVENTS_DELIVERED = Counter(
    "firstmile_events_delivered_total",
    "Accepted Segment messages by how they were made durable before the answer: kafka (direct) or outbox.",
    ["path"],
)
EVENTS_REJECTED = Counter("firstmile_events_rejected_total", "Segment messages rejected, by field.", ["field"])
RELAY_PUBLISHED = Counter("firstmile_relay_published_total", "Outbox rows acknowledged by the event bus.")
RELAY_BACKLOG = Gauge(
    "firstmile_relay_backlog", "Outbox rows seen unpublished at the last relay poll.", multiprocess_mode="max"
)
RELAY_LAG = Gauge(
    "firstmile_relay_lag_seconds",
    "Age of the oldest outbox row not yet published at the last relay poll (0: none); the freshness SLO's measure.",
    multiprocess_mode="max",
)
CONSUMED = Counter(
    "firstmile_events_consumed_total", "Events handled by a consumer, by consumer and outcome.", ["consumer", "outcome"]
)
DEAD_LETTERS = Counter("firstmile_dead_letters_total", "Events dead-lettered, by consumer.", ["consumer"])
PLANNER_FALLBACKS = Counter(
    "firstmile_planner_fallbacks_total", "Path decisions where the model was not used, by reason.", ["reason"]
)
INFERENCE_LATENCY = Histogram(
    "firstmile_inference_seconds",
    "Model calls from the platform, by model and outcome.",
    ["model", "outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
EXPERIMENT_EXPOSURES = Counter(
    "firstmile_experiment_exposures_total", "First exposures of users to experiments, by variant.", ["variant"]
)
EXPERIMENT_ALLOCATION_FALLBACKS = Counter(
    "firstmile_experiment_allocation_fallbacks_total",
    "Starts whose experiment allocation failed or timed out and got control (the planner's path), by error.",
    ["error"],
)
EXPERIMENT_ALLOCATION_CONSISTENCY = Counter(
    "firstmile_experiment_reallocations_total",
    "Allocations of an already exposed user computed again (a repeated start, another process or region), by "
    "whether they agree with the recorded exposure; experiment_allocation_consistency = agree / all.",
    ["outcome"],
)
EXPERIMENT_REVIEWS = Counter(
    "firstmile_experiment_reviews_total",
    "Scheduled looks at running experiments, by what came of them (continue, deferred, srm_alert, extend, conclude).",
    ["action"],
)
DROPOFF_CHECKS = Counter(
    "firstmile_dropoff_checks_total",
    "Scheduled drop-off checks of a tenant, by outcome (checked; skipped: the analytics store failed or timed out; "
    "failed: any other error).",
    ["outcome"],
)
DROPOFF_ALERTS = Counter("firstmile_dropoff_alerts_total", "Drop-off alerts raised, by direction.", ["direction"])
ALERT_DELIVERIES = Counter(
    "firstmile_alert_deliveries_total",
    "Deliveries of drop-off alerts and review-queue notifications attempted, by channel (email, webhook) and "
    "outcome (delivered, failed).",
    ["channel", "outcome"],
)
REVIEW_QUEUE_LENGTH = Gauge(
    "firstmile_review_queue_length",
    "Pending reviews of every tenant, by kind (step, ambiguous, decision), at the scheduler's last queue check.",
    ["kind"],
    multiprocess_mode="max",
)
REVIEW_QUEUE_OLDEST = Gauge(
    "firstmile_review_queue_oldest_seconds",
    "Age of the oldest pending review of any tenant, by kind, at the scheduler's last queue check (0: none).",
    ["kind"],
    multiprocess_mode="max",
)
REVIEWS_CREATED = Counter(
    "firstmile_reviews_created_total", "Reviews queued for a person, by kind and reason.", ["kind", "reason"]
)
REVIEWS_DECIDED = Counter(
    "firstmile_reviews_decided_total",
    "Reviews decided, by kind and status (approved, rejected, right, wrong).",
    ["kind", "status"],
)
NUDGE_DECISIONS = Counter(
    "firstmile_nudge_decisions_total", "Nudge decisions, by outcome (scheduled or denied).", ["outcome"]
)
NUDGE_SENDS = Counter(
    "firstmile_nudge_sends_total",
    "Nudge send attempts, by channel and outcome (sent, retrying, deferred, dead, rejected).",
    ["channel", "outcome"],
)
NUDGE_OUTCOMES = Counter(
    "firstmile_nudge_outcomes_total",
    "What users did with sent nudges (clicked, converted, unsubscribed, opened).",
    ["kind"],
)
DESTINATION_QUEUED = Counter(
    "firstmile_destination_queued_total",
    "Lifecycle events and erasures queued for the tenants' destinations, by destination kind.",
    ["kind"],
)
DESTINATION_SENT = Counter(
    "firstmile_destination_sent_total", "Events a destination acknowledged, by destination kind.", ["kind"]
)
DESTINATION_FAILED = Counter(
    "firstmile_destination_failed_total",
    "Delivery attempts that failed and will be retried (a 5xx, 429, timeout), by destination kind.",
    ["kind"],
)
DESTINATION_DEAD = Counter(
    "firstmile_destination_dead_total",
    "Events dead-lettered (refused for good, or out of attempts), by destination kind.",
    ["kind"],
)
DESTINATION_LAG = Gauge(
    "firstmile_destination_lag_seconds",
    "Age of the oldest event waiting at any destination of a kind, at the delivery worker's last poll (0: none).",
    ["kind"],
    multiprocess_mode="max",
)
DESTINATION_DISABLED = Counter(
    "firstmile_destination_disabled_total",
    "Destinations disabled automatically after every attempt failed for too long, by destination kind.",
    ["kind"],
)
DESTINATION_ERASURES = Counter(
    "firstmile_destination_erasures_total",
    "User erasures forwarded to destinations, by destination kind and outcome (done, unsupported, failed).",
    ["kind", "outcome"],
)
STUCK_DETECTED = Counter("firstmile_stuck_detected_total", "Users flagged stuck, by detector.", ["detected_by"])
AUDIT_MERGE_DELAY = Histogram(
    "firstmile_audit_merge_delay_seconds",
    "Time from an audit entry's creation (in the writer's transaction) to its sequencing into the log.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
AUDIT_SEQUENCED = Counter("firstmile_audit_sequenced_total", "Audit entries the sequencer placed in a log.")
AUDIT_QUEUE_OLDEST = Gauge(
    "firstmile_audit_queue_oldest_seconds",
    "Age of the oldest queued (not yet sequenced) audit entry at the sequencer's last poll (0: none).",
    multiprocess_mode="max",
)
AUDIT_SEQUENCER_FAILURES = Counter(
    "firstmile_audit_sequencer_integrity_failures_total",
    "Sequencer batches refused because a queued entry no longer matched its leaf hash.",
)
ERRORS = Counter("firstmile_errors_total", "Problem responses sent, by problem type and status.", ["type", "status"])


def metrics_payload() -> bytes:
    """The Prometheus text exposition for this process, or all workers."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with request context when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        tenant = tenant_var.get()
        if tenant:
            entry["tenant"] = tenant
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class ConsoleFormatter(logging.Formatter):
    """Human-readable lines that keep the structured fields as ``key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = dict(getattr(record, "fields", None) or {})
        for name, var in (("request_id", request_id_var), ("tenant", tenant_var)):
            if var.get():
                fields[name] = var.get()
        return line + "".join(f" {k}={v}" for k, v in fields.items())


def configure_logging(level: str = "INFO", fmt: str = "json", filters: Sequence[logging.Filter] = ()) -> None:
    """Route the root logger to stderr in the chosen format (idempotent); ``filters`` see every record."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_firstmile", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._firstmile = True  # type: ignore[attr-defined]
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(ConsoleFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    for log_filter in filters:
        handler.addFilter(log_filter)
    root.addHandler(handler)
    root.setLevel(level)


_provider: TracerProvider | None = None


def configure_tracing(
    service_name: str, exporter: str, endpoint: str | None, extra_exporter: SpanExporter | None = None
) -> TracerProvider:
    """Install the process's tracer provider once; later calls reuse it."""
    global _provider
    if _provider is None:
        _provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if exporter == "console":
            _provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            traces_url = endpoint.rstrip("/") + "/v1/traces" if endpoint else None
            _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url)))
        trace.set_tracer_provider(_provider)
    if extra_exporter is not None:
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        _provider.add_span_processor(SimpleSpanProcessor(extra_exporter))
    return _provider


tracer = trace.get_tracer("firstmile")
