"""Authentication of tenant apps: API keys and client-credentials tokens resolve to a principal."""
