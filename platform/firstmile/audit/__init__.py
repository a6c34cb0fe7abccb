"""Audit log: a per-tenant hash chain, signed Merkle checkpoints, proofs and verification."""
