"""Generative goal models: goal-mask networks, their probability paths and NAMO scene data."""
