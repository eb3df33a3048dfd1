"""icrt: in-context imitation learning for robots."""

__version__ = "0.1.0"
