"""Acting and evaluation: ``InContextPolicy`` (prompted inference) and ``evaluate`` (rollouts)."""
