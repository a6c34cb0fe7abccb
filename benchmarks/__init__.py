"""Firstmile's benchmarks: ``python -m benchmarks NAME`` from the repository root (see README.md here).

Not part of the ``firstmile`` distribution: nothing in ``platform/`` or ``inference/`` imports this package.
"""
