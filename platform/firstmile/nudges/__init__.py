"""Nudges: the nudge executor (what to send, where and when), its policy guardrails, and the channels."""
