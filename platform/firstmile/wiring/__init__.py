"""The wiring: the only layer that reads the settings, picks an adapter for each port and assembles services.

See docs/architecture.md for the layers and docs/contributing.md for how a new slice is wired.
"""
