"""Policy improvement from the policy's own rollouts: PPO fine-tuning and interactive DAgger."""
