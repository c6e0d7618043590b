"""Evaluation: held-out losses, generation and classification metrics, the report. (docs/architecture.md, "Layers inside glm")."""
