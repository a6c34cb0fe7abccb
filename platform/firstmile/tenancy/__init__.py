"""Tenants, manifests, API keys and regions."""
