"""Firstmile: adaptive, multi-tenant onboarding for B2B SaaS."""

__version__ = "0.1.0"
