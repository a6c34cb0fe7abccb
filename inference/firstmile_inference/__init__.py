"""Firstmile's models, training and serving; deploys on its own (no ``firstmile`` import)."""

__version__ = "0.1.0"
