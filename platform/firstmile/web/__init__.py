"""The admin UI: server-rendered pages (Jinja2, autoescaped) over the admin API."""
