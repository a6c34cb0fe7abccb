"""Experiments: the experiment orchestrator (allocation of users to path variants, the statistics that judge
them, the lifecycle from draft to promotion) and its API (docs/experiments.md)."""
