"""The wire contract of Firstmile's models: feature names, vocabularies, request and response shapes.

Everything that crosses the boundary between the platform and a model (in-process
or over Ray Serve's HTTP JSON API) is a plain JSON object described here. The
platform builds these objects from its feature store and progress state; the
models read nothing else.

Categorical values outside a vocabulary (or absent) are *unknown*: every encoder
maps them to index 0, so a tenant's custom persona never breaks a request.
"""

from __future__ import annotations

from typing import Final, Literal, TypedDict

ModelName = Literal["path_classifier", "stuck_detector", "nudge_response_predictor"]
MODEL_NAMES: Final[tuple[ModelName, ...]] = ("path_classifier", "stuck_detector", "nudge_response_predictor")

# ---- vocabularies (index 0 of each encoder is "unknown") ----
PERSONAS: Final = ("developer", "analyst", "admin", "marketer", "executive", "product_manager")
SIGNUP_SOURCES: Final = ("organic", "paid_search", "referral", "partner", "sales_led", "social")
COMPANY_SIZES: Final = ("1-10", "11-50", "51-200", "201-1000", "1001+")
USE_CASES: Final = ("product_analytics", "marketing", "reporting", "data_engineering", "customer_success")
ROLES: Final = ("individual", "team_lead", "it_admin", "executive")
CHANNELS: Final = ("email", "sms", "in_app", "push")

# The demo tenant's path keys (tenants/demo.yaml); a model records the keys it was trained on.
DEMO_PATHS: Final = (
    "enterprise-rollout",
    "developer-quickstart",
    "analyst-reports",
    "workspace-admin",
    "marketing-campaigns",
    "product-analytics",
    "generic",
)

# ---- the nine features of the seed design (the path classifier's input) ----
CATEGORICAL_FEATURES: Final = ("user_persona", "signup_source", "company_size", "use_case")
NUMERIC_FEATURES: Final = (
    "engagement_score",  # 0..100
    "time_since_signup",  # hours
    "steps_completed",  # count
    "session_count",  # count
    "avg_session_duration",  # seconds
)
USER_FEATURES: Final = CATEGORICAL_FEATURES + NUMERIC_FEATURES

VOCABULARIES: Final[dict[str, tuple[str, ...]]] = {
    "user_persona": PERSONAS,
    "signup_source": SIGNUP_SOURCES,
    "company_size": COMPANY_SIZES,
    "use_case": USE_CASES,
    "channel": CHANNELS,
    "path": DEMO_PATHS,
}


class UserFeatures(TypedDict, total=False):
    """The nine features; categoricals may be ``None`` (unknown), numerics default to 0."""

    user_persona: str | None
    signup_source: str | None
    company_size: str | None
    use_case: str | None
    engagement_score: float
    time_since_signup: float
    steps_completed: float
    session_count: float
    avg_session_duration: float


class StuckFeatures(UserFeatures, total=False):
    """A user part-way through a path, as the stuck detector sees them."""

    path: str
    step_index: float  # 0-based index of the current step among the path's required steps
    steps_total: float  # required steps on the path
    hours_since_last_activity: float
    hours_on_current_step: float
    events_last_24h: float


class NudgeFeatures(UserFeatures, total=False):
    """A candidate nudge: who, on which channel, when."""

    channel: str
    hour_of_day: float  # 0..23, in the user's local time when known, else UTC
    nudges_sent: float  # nudges this user already received in this onboarding
    hours_since_last_activity: float


class PathPrediction(TypedDict):
    scores: dict[str, float]  # activation probability per path key
    path: str  # the argmax among the candidates
    confidence: float  # the chosen path's activation probability


class StuckPrediction(TypedDict):
    stuck_probability: float
    stuck: bool  # stuck_probability >= the model's calibrated threshold


class NudgePrediction(TypedDict):
    response_probability: float
