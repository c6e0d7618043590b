"""GLM blank-infilling pretraining, fine-tuning, evaluation and export, without Prefect.

The modules live in layer subpackages (docs/architecture.md, "Layers inside glm"): core, data,
training, finetuning, evaluation, the pipeline; export, runtime, bundles, released, launch and
distributed stay at the top. Modules moved there in 2026-12 stay importable under their old names:
`glm.model` IS `glm.core.model` (the same module object, so patching one patches the other), and
`python -m glm.train` still trains. MOVED is the table; a finder on sys.meta_path resolves it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

# old name (under glm) -> where the module is now (under glm)
MOVED = {
    "config": "core.config",
    "contracts": "core.contracts",
    "shards": "core.shards",
    "model": "core.model",
    "tokenizer": "core.tokenizer",
    "special_tokens": "core.special_tokens",
    "safety": "core.safety",
    "runlock": "core.runlock",
    "errors": "core.errors",
    "metrics": "core.metrics",
    "released_tokenizer": "core.released_tokenizer",
    "corpus": "data.corpus",
    "quality": "data.quality",
    "tokenize_shards": "data.tokenize_shards",
    "infilling": "data.infilling",
    "infill_shards": "data.infill_shards",
    "loader": "data.loader",
    "train": "training.train",
    "budget": "training.budget",
    "pretrain_plan": "training.pretrain_plan",
    "step": "training.step",
    "checkpoint": "training.checkpoint",
    "finetune": "finetuning.finetune",
    "heads": "finetuning.heads",
    "evaluate": "evaluation.evaluate",
    "report": "evaluation.report",
    "generate": "evaluation.generate",
}


_REAL_SPECS: dict[str, Any] = {}  # old name -> the moved module's own spec


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import glm.OLD` gives the module at its new place (imported once, under its new name)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        old = fullname.removeprefix("glm.")
        if fullname.startswith("glm.") and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        module = importlib.import_module(f"glm.{MOVED[spec.name.removeprefix('glm.')]}")
        _REAL_SPECS[spec.name] = module.__spec__  # the import system sets the alias's spec on it: put it back
        return module

    def exec_module(self, module: Any) -> None:
        module.__spec__ = _REAL_SPECS[module.__spec__.name]

    def get_code(self, fullname: str) -> Any:  # `python -m glm.train`: runpy runs the moved module's code
        real = f"glm.{MOVED[fullname.removeprefix('glm.')]}"
        return importlib.util.find_spec(real).loader.get_code(real)


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
