"""The data layer: corpus ingestion, quality gates, tokenized shards, blank-infilling shards, the loader. (docs/architecture.md, "Layers inside glm")."""
