"""Domain events: the transactional outbox (relay and consumers come later)."""
