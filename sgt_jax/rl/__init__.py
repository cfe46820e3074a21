"""UAE's Unified-GRPO on BAGEL: reconstruction rewards, rollouts, the GRPO loss and the RL loop
(docs/rl.md)."""
