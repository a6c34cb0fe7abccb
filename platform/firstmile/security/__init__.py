"""Security: key management, field encryption, PII guardrail."""
