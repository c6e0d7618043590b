"""Import and export the released GLM checkpoints (THUDM/GLM and the THUDM/glm-* model repos).

A released checkpoint directory, as published, holds one of

    config.json + pytorch_model.bin                       (glm-large, glm-roberta-large, ...)
    config.json + pytorch_model.bin.index.json + shards   (glm-10b)
    config.json + model.safetensors[.index.json]          (re-saved copies)
    mp_rank_00_model_states.pt                            (DeepSpeed, model parallelism 1: weights under "module")

with the reference's state-dict names (model/modeling_glm.py + mpu/transformer.py):

    word_embeddings.weight                                   (V, C); the output projection is tied to it
    transformer.position_embeddings.weight                   (max_sequence_length + 1, C)
    transformer.block_position_embeddings.weight             (max_sequence_length + 1, C)
    transformer.layers.N.input_layernorm.{weight,bias}
    transformer.layers.N.attention.query_key_value.*         fused (3C, C): q, k, v each split into heads
    transformer.layers.N.attention.dense.*
    transformer.layers.N.post_attention_layernorm.*
    transformer.layers.N.mlp.dense_h_to_4h.* / dense_4h_to_h.*
    transformer.final_layernorm.*

The reference block is exactly glm/core/model.py's learned-position GLM: pre-LN, LayerNorm eps 1e-5,
tanh-approximated GeLU, scores q.k / sqrt(head_dim) under the same prefix-LM mask (its
`attention_scale` > 1 only rescales before a row-max shift, which softmax cancels), so the import
is a renaming: no config knob of this project's model changes. Unknown keys are an error that names
them; only the stray classification-head keys some releases carry (`dense.*`, `out_proj.*`,
glm-2b) are skipped, by an explicit allow-list.

Loading streams: one weight file at a time, memory-mapped (safetensors, or torch.load(mmap=True)),
each tensor cast to the target dtype as it is copied, into a model built on the meta device, so the
peak is about the model in the target dtype, not twice it. The bytes needed are estimated first and
an import that cannot fit in available memory is refused with one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from glm.core.config import ModelConfig
from glm.core.shards import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
ST_FILE = "model.safetensors"
ST_INDEX = "model.safetensors.index.json"
DS_FILE = "mp_rank_00_model_states.pt"

# keys some releases carry beside the language model (glm-2b: a classification head left in the
# state dict); they are not part of GLMModel and are skipped by name, nothing else is
IGNORED_KEYS = re.compile(r"^(dense|out_proj)\.(weight|bias)$")
# wrappers whose prefix is stripped: HF GLMForConditionalGeneration ("glm."), DeepSpeed/DDP
# ("module."), the reference's downstream GLMFor* classes ("model.")
_PREFIXES = ("module.", "glm.", "model.")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# (reference name pattern, this project's name pattern); N is the layer index
_LAYER_MAP = {
    "input_layernorm": "ln_1",
    "attention.query_key_value": "attn.qkv",
    "attention.dense": "attn.proj",
    "post_attention_layernorm": "ln_2",
    "mlp.dense_h_to_4h": "mlp.fc",
    "mlp.dense_4h_to_h": "mlp.proj",
}
_TOP_MAP = {
    "word_embeddings.weight": "wte.weight",
    "transformer.position_embeddings.weight": "wpe.weight",
    "transformer.block_position_embeddings.weight": "wbpe.weight",
    "transformer.final_layernorm.weight": "ln_f.weight",
    "transformer.final_layernorm.bias": "ln_f.bias",
}
_LAYER_KEY = re.compile(r"^transformer\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class ReleasedCheckpointError(ValueError):
    """A released checkpoint directory that cannot be imported; the message names the input and the fix."""


# --------------------------------------------------------------------------- names


def reference_to_local(key: str) -> str | None:
    """This project's parameter name for a reference state-dict key, or None if it has none."""
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    if key in _TOP_MAP:
        return _TOP_MAP[key]
    m = _LAYER_KEY.match(key)
    if m and m.group(2) in _LAYER_MAP:
        return f"blocks.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
    return None


def local_to_reference(key: str) -> str:
    """The reference's state-dict key of one of this project's parameter names (export)."""
    inverse_top = {v: k for k, v in _TOP_MAP.items()}
    if key in inverse_top:
        return inverse_top[key]
    m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
    inverse_layer = {v: k for k, v in _LAYER_MAP.items()}
    if m and m.group(2) in inverse_layer:
        return f"transformer.layers.{m.group(1)}.{inverse_layer[m.group(2)]}.{m.group(3)}"
    raise KeyError(f"{key} has no name in the released GLM layout")


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


# --------------------------------------------------------------------------- the files


def _ds_file(directory: Path) -> Path | None:
    """The DeepSpeed model-states file in `directory` or in the step folder its `latest` file names."""
    if (directory / DS_FILE).is_file():
        return directory / DS_FILE
    for marker in ("latest", "latest_checkpointed_iteration.txt"):
        if (directory / marker).is_file():
            sub = directory / (directory / marker).read_text().strip()
            if (sub / DS_FILE).is_file():
                return sub / DS_FILE
    return None


def weight_files(directory: str | Path) -> tuple[str, list[Path]]:
    """(format, files) of a released checkpoint directory: safetensors, bin or deepspeed."""
    d = Path(directory)
    if not d.is_dir():
        raise ReleasedCheckpointError(
            f"released checkpoint {d} is not a directory; point model.init.from at the folder holding config.json"
        )
    for index, kind in ((ST_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        if (d / index).is_file():
            try:
                weight_map = json.loads((d / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ReleasedCheckpointError(f"{d / index} is not a shard index ({e}); re-download it") from None
            files = sorted({d / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ReleasedCheckpointError(f"{d / index} names shards that are missing: {missing}; download them too")
            return kind, files
    if (d / ST_FILE).is_file():
        return "safetensors", [d / ST_FILE]
    if (d / BIN_FILE).is_file():
        return "bin", [d / BIN_FILE]
    ds = _ds_file(d)
    if ds is not None:
        if any(ds.parent.glob("mp_rank_0[1-9]_model_states.pt")):
            raise ReleasedCheckpointError(
                f"{ds.parent} holds a model-parallel DeepSpeed checkpoint (more than mp_rank_00); "
                "merge it to one partition with the reference's change_mp.py first"
            )
        return "deepspeed", [ds]
    raise ReleasedCheckpointError(
        f"{d} holds no GLM weights: expected {BIN_FILE}, {BIN_INDEX}, {ST_FILE}, {ST_INDEX} or {DS_FILE}"
    )


def _torch_load(path: Path) -> dict[str, Any]:
    """torch.load memory-mapped and weights-only (a DeepSpeed file's argparse.Namespace is allowed)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # a legacy (pre-zip) file cannot be memory-mapped: read it whole
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - one line naming the file and the fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReleasedCheckpointError(
            f"{path} cannot be read as a weights-only torch file ({first}); if you trust it, re-save its "
            "weights alone: torch.save(torch.load(PATH, weights_only=False)['module'], 'pytorch_model.bin')"
        ) from None


def iter_tensors(directory: str | Path) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """Yield (file, reference key, tensor) one tensor at a time, one weight file after the other.

    safetensors reads each tensor when asked (so at most one is in memory beside the model); torch
    files are memory-mapped, so a tensor's pages are read when it is copied.
    """
    kind, files = weight_files(directory)
    for path in files:
        if kind == "safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in f.keys():
                    yield path, k, f.get_tensor(k)
            continue
        obj = _torch_load(path)
        if kind == "deepspeed":
            if not isinstance(obj, dict) or "module" not in obj:
                raise ReleasedCheckpointError(f"{path} has no 'module' entry; is it a DeepSpeed model-states file?")
            obj = obj["module"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ReleasedCheckpointError(f"{path} is not a state dict of tensors")
        for k in list(obj):
            yield path, k, obj.pop(k)
        del obj


def shard_shapes(directory: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{reference key: (shape, dtype)} of every tensor, without reading the data (headers / mmap)."""
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    kind, files = weight_files(directory)
    for path in files:
        if kind == "safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), _st_dtype(sl.get_dtype()))
        else:
            for _, sd in iter_shards_one(kind, path):
                out.update({k: (tuple(v.shape), v.dtype) for k, v in sd.items()})
    return out


def iter_shards_one(kind: str, path: Path) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    obj = _torch_load(path)
    if kind == "deepspeed":
        obj = obj.get("module", {}) if isinstance(obj, dict) else {}
    yield path, {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _st_dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}.get(name, torch.float32)


# --------------------------------------------------------------------------- the config


def released_model_config(
    directory: str | Path, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None, n_head: int | None = None
) -> ModelConfig:
    """This project's ModelConfig for a released checkpoint: from config.json, checked against the weights.

    Without config.json (a bare DeepSpeed file) the dimensions come from the weight shapes; the head
    count, which shapes cannot tell, is `n_head` if given, else hidden_size / 64 (every released GLM
    uses 64-wide heads).
    """
    d = Path(directory)
    shapes = shard_shapes(d) if shapes is None else shapes
    by_name = {_strip(k): v[0] for k, v in shapes.items()}
    need = ["word_embeddings.weight", "transformer.position_embeddings.weight"]
    missing = [k for k in need if k not in by_name]
    if missing:
        raise ReleasedCheckpointError(f"{d} is not a GLM checkpoint: no {missing} among its weights")
    if "transformer.block_position_embeddings.weight" not in by_name:
        raise ReleasedCheckpointError(
            f"{d} has no transformer.block_position_embeddings: only GLM checkpoints with 2D (block) "
            "positions are supported (the released GLMs all have them)"
        )
    vocab, hidden = by_name["word_embeddings.weight"]
    rows = by_name["transformer.position_embeddings.weight"][0]
    n_layer = 1 + max(int(m.group(1)) for k in by_name if (m := _LAYER_KEY.match(k)))
    ref: dict[str, Any] = {}
    if (d / CONFIG_FILE).is_file():
        try:
            ref = json.loads((d / CONFIG_FILE).read_text())
        except json.JSONDecodeError as e:
            raise ReleasedCheckpointError(f"{d / CONFIG_FILE} is not JSON ({e}); re-download it") from None
        for key in ("relative_encoding",):
            if ref.get(key):
                raise ReleasedCheckpointError(f"{d / CONFIG_FILE} sets {key}: true, which this project's GLM does not implement")
        if ref.get("block_position_encoding") is False:
            raise ReleasedCheckpointError(
                f"{d / CONFIG_FILE} sets block_position_encoding: false; only 2D positions are supported"
            )
        if ref.get("spell_length"):
            raise ReleasedCheckpointError(
                f"{d / CONFIG_FILE} has a P-tuning prompt (spell_length); import the base model instead"
            )
        checks = {
            "vocab_size": vocab,
            "hidden_size": hidden,
            "num_layers": n_layer,
            "max_sequence_length": rows - 1,
        }
        wrong = [f"{k}={ref[k]} but the weights say {v}" for k, v in checks.items() if k in ref and int(ref[k]) != v]
        if wrong:
            raise ReleasedCheckpointError(f"{d / CONFIG_FILE} does not match its weights: {'; '.join(wrong)}")
    heads = ref.get("num_attention_heads")
    if heads is not None and n_head is not None and int(heads) != n_head:
        raise ReleasedCheckpointError(f"{d / CONFIG_FILE} says num_attention_heads={heads}, not {n_head}; drop the override")
    n_head = int(heads) if heads is not None else (n_head or max(1, hidden // 64))
    if hidden % n_head:
        raise ReleasedCheckpointError(f"{d}: hidden_size {hidden} is not divisible by num_attention_heads {n_head}")
    mlp = by_name.get("transformer.layers.0.mlp.dense_h_to_4h.weight", (4 * hidden, hidden))[0]
    if mlp % hidden:
        raise ReleasedCheckpointError(f"{d}: MLP width {mlp} is not a multiple of hidden_size {hidden}")
    return ModelConfig(
        vocab_size=vocab,
        n_layer=n_layer,
        n_head=n_head,
        hidden_size=hidden,
        mlp_ratio=mlp // hidden,
        max_seq_len=rows - 1,
        dropout=float(ref.get("output_dropout_prob", 0.1)),
        attention_dropout=float(ref.get("attention_dropout_prob", 0.1)),
        rotary_2d=False,
        layernorm_eps=1e-5,  # the reference's GPT2ParallelTransformer default; config.json does not carry it
    )


# --------------------------------------------------------------------------- memory


def available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (the cgroup limit if lower), or a large number if unknown."""
    avail = 1 << 62
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            avail = min(avail, int(text))
    return avail


def bytes_needed(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], dtype: torch.dtype, legacy_bytes: int = 0) -> int:
    """The model in `dtype`, plus the largest tensor as read (one is in flight at a time), 10% and 256 MiB
    for the process, plus any file that cannot be memory-mapped."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    model = sum(itemsize * _numel(shape) for k, (shape, _) in shapes.items() if reference_to_local(k) is not None)
    largest = max((_numel(shape) * torch.empty((), dtype=dt).element_size() for shape, dt in shapes.values()), default=0)
    return int(model * 1.1) + largest + (256 << 20) + legacy_bytes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --------------------------------------------------------------------------- import


def import_released(
    directory: str | Path,
    dtype: str | torch.dtype = "float32",
    *,
    available: int | None = None,
    n_head: int | None = None,
    special: Any = None,
) -> tuple[torch.nn.Module, ModelConfig]:
    """(GLM model with the released weights, its ModelConfig).

    `n_head` is needed only without config.json (a bare DeepSpeed file); `available` overrides the memory
    probe; `special` (the released tokenizer's SpecialTokens) is recorded as ModelConfig.special_tokens,
    so generation and fine-tuning use the ids the model was trained with.
    """
    from glm.core.model import GLM  # model imports config only; keep this module importable without building one

    d = Path(directory)
    dt = _DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if dt is None:
        raise ReleasedCheckpointError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    shapes = shard_shapes(d)
    unknown = sorted(k for k in shapes if reference_to_local(k) is None and not IGNORED_KEYS.match(_strip(k)))
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise ReleasedCheckpointError(
            f"{d} has weights this project's GLM has no place for: {shown}; only the released GLMModel "
            "layout is supported (a fine-tuned model's task head must be removed first)"
        )
    cfg = released_model_config(d, shapes, n_head)
    if special is not None:
        if max(special.as_dict().values()) >= cfg.vocab_size:
            raise ReleasedCheckpointError(
                f"{d}: the tokenizer's special ids reach {max(special.as_dict().values())} but the model has "
                f"{cfg.vocab_size} rows; the tokenizer belongs to another model"
            )
        cfg = cfg.model_copy(update={"special_tokens": special.as_dict()})
    need = bytes_needed(shapes, dt)
    have = available_memory() if available is None else available
    if need > have:
        raise ReleasedCheckpointError(
            f"importing {d} in {str(dt).removeprefix('torch.')} needs about {need / 2**30:.1f} GiB but "
            f"{have / 2**30:.1f} GiB is available; free memory or import in bfloat16 (model.init.dtype)"
        )
    with torch.device("meta"):
        model = GLM(cfg)
    wanted = set(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    shapes_of = {k: v.shape for k, v in model.state_dict().items()}  # meta tensors: shapes only
    for path, key, t in iter_tensors(d):
        local = reference_to_local(key)
        if local is None:
            skipped.append(key)
            continue
        if local in state:
            raise ReleasedCheckpointError(f"{d}: {key} appears twice (as {local}); the shard index is inconsistent")
        if t.shape != shapes_of[local]:
            raise ReleasedCheckpointError(f"{d}: {key} has shape {tuple(t.shape)}, expected {tuple(shapes_of[local])}")
        # copy=True: the model never aliases the memory-mapped file, and the cast happens here, one tensor at a time
        state[local] = t.to(dtype=dt, copy=True)
        del t
    missing = sorted(wanted - set(state))
    if missing:
        raise ReleasedCheckpointError(f"{d} lacks weights: {', '.join(missing[:8])}; the checkpoint is incomplete")
    model.load_state_dict(state, strict=True, assign=True)
    if skipped:
        log.warning("skipped %d allow-listed key(s) that are not part of GLMModel: %s", len(skipped), ", ".join(skipped))
    return model.eval(), cfg


# --------------------------------------------------------------------------- export


def released_config_json(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json in the released layout (the fields the THUDM GLM code reads)."""
    return {
        "architectures": ["GLMModel"],
        "model_type": "glm",
        "num_layers": cfg.n_layer,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.n_head,
        "embedding_dropout_prob": cfg.dropout,
        "attention_dropout_prob": cfg.attention_dropout,
        "output_dropout_prob": cfg.dropout,
        "max_sequence_length": cfg.max_seq_len,
        "max_memory_length": 0,
        "checkpoint_activations": False,
        "checkpoint_num_layers": 1,
        "parallel_output": True,
        "relative_encoding": False,
        "block_position_encoding": True,
        "output_predict": True,
        "spell_length": None,
        "spell_func": "lstm",
        "attention_scale": 1.0,
        "initializer_range": 0.02,
        "pool_token": "cls",
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def export_released(
    model: torch.nn.Module, cfg: ModelConfig, out_dir: str | Path, extra_files: dict[str, bytes] | None = None
) -> Path:
    """Write config.json + pytorch_model.bin (reference names) into `out_dir`, each file atomically."""
    if cfg.rotary_2d:
        raise ReleasedCheckpointError(
            "a model with model.rotary_2d has no released-GLM layout (the reference uses learned 2D tables)"
        )
    if cfg.mlp_ratio != 4:
        raise ReleasedCheckpointError(f"model.mlp_ratio={cfg.mlp_ratio}: the reference GLM's MLP is fixed at 4x")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    ref = {local_to_reference(k): v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    dtype = next(iter(ref.values())).dtype
    with atomic_path(out / BIN_FILE) as tmp:
        torch.save(ref, tmp)
    for name, data in (extra_files or {}).items():
        with atomic_path(out / name) as tmp:
            Path(tmp).write_bytes(data)
    atomic_write_json(out / CONFIG_FILE, released_config_json(cfg, dtype))  # last: a directory with config.json is complete
    return out


def released_dimensions(
    directory: str | Path, *, tokenizer: str | Path | None = None, n_head: int | None = None
) -> dict[str, Any]:
    """The ModelConfig fields a released GLM fixes (dimensions and its tokenizer's special ids), read from
    its config.json, weight headers and tokenizer files (no weights are loaded)."""
    from glm.core.released_tokenizer import ReleasedTokenizer

    cfg = released_model_config(directory, n_head=n_head)
    tok = ReleasedTokenizer(Path(tokenizer) if tokenizer is not None else Path(directory))
    if tok.vocab_size > cfg.vocab_size:
        raise ReleasedCheckpointError(
            f"the tokenizer in {tok.directory} has {tok.vocab_size} ids but the model has {cfg.vocab_size} rows; not one release"
        )
    keys = ("vocab_size", "n_layer", "n_head", "hidden_size", "mlp_ratio", "max_seq_len", "rotary_2d", "layernorm_eps")
    return {k: getattr(cfg, k) for k in keys} | {"special_tokens": tok.special.as_dict()}


# --------------------------------------------------------------------------- to and from pipeline checkpoints


def import_to_checkpoint(
    released_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    n_head: int | None = None,
    tokenizer_dir: str | Path | None = None,
    available: int | None = None,
) -> tuple[Path, Path]:
    """Import a released GLM as this pipeline's checkpoint `out_dir/checkpoints/step-000000` and its
    tokenizer as `out_dir/tokenizer/`; returns (checkpoint dir, tokenizer dir).

    The tokenizer files are looked for in `tokenizer_dir`, else next to the weights (the THUDM repos
    ship them together); the model records the tokenizer's special ids.
    """
    from glm.core.released_tokenizer import ReleasedTokenizer, save_released_tokenizer
    from glm.training.checkpoint import save_checkpoint

    out = Path(out_dir)
    tok = ReleasedTokenizer(Path(tokenizer_dir) if tokenizer_dir is not None else Path(released_dir))
    model, cfg = import_released(released_dir, dtype, n_head=n_head, special=tok.special, available=available)
    if tok.vocab_size > cfg.vocab_size:
        raise ReleasedCheckpointError(
            f"the tokenizer in {tok.directory} has {tok.vocab_size} ids but the model in {released_dir} has "
            f"{cfg.vocab_size} rows; they are not one release"
        )
    tok_dir = out / "tokenizer"
    save_released_tokenizer(tok, tok_dir)
    extra = {"imported_from": str(Path(released_dir).resolve()), "tokenizer_kind": tok.kind}
    ckpt = save_checkpoint(out / "checkpoints", 0, model.state_dict(), {}, model_config=cfg, extra_meta=extra)
    return ckpt, tok_dir


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """A pipeline checkpoint (pretrained or fine-tuned; a linear head is left out) in the released layout:
    config.json + pytorch_model.bin with the reference's names, which THUDM's GLMModel loads. With
    `tokenizer` (a run's tokenizer directory or tokenizer.model) its files are copied beside them: a
    released GLM's vocabulary files as they came, or this pipeline's sentencepiece tokenizer.model,
    whose special ids ([MASK]=4 ...) the reference's tokenizer classes do not know (use them by id)."""
    from glm.core.tokenizer import load_tokenizer
    from glm.training.checkpoint import load_model, resolve_checkpoint

    path = resolve_checkpoint(checkpoint_dir)
    model, cfg = load_model(path)
    extra: dict[str, bytes] = {}
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        extra = tok.files() if getattr(tok, "released", False) else {"tokenizer.model": tok.model_proto}
    return export_released(model, cfg, out_dir, extra_files=extra)
