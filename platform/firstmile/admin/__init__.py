"""The admin UI and its API: SSO login, sessions, CSRF, role-based access."""
