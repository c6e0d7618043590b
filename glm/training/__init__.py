"""The training layer: the one training step, the pretraining loop, budgets, checkpoints. (docs/architecture.md, "Layers inside glm")."""
