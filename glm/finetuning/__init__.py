"""Downstream tasks: cloze and seq2seq fine-tuning, the linear classification head. (docs/architecture.md, "Layers inside glm")."""
