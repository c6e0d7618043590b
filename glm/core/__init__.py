"""The core every layer uses: the typed config, the manifests and contracts, the model, the tokenizer. (docs/architecture.md, "Layers inside glm")."""
