"""Onboarding paths, progress, the path planner and the onboarding API."""
