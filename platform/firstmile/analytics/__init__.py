"""Analytics: the events store (chdb embedded, ClickHouse in production), tenant-scoped queries, API."""
