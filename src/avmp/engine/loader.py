"""Load a Hugging Face checkpoint directory (config.json + safetensors, sharded or not)
into one of the engine's own models.

transformers is used only to parse ``config.json`` (AutoConfig knows each family's
defaults and legacy field names); the weights go through ``safetensors`` straight into
our modules, whose parameter names match transformers'. Anything missing or malformed
raises one `CheckpointError` that names what is wrong.

Under tensor parallelism each rank reads only its shard of every tensor (safetensors'
lazy slices, range by range, as each parameter's `Shard` says), so no rank ever holds
the whole model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from avmp.engine.experts import ExpertSlice
from avmp.engine.models import model_class
from avmp.engine.models.base import HybridModel
from avmp.engine.parallel.group import SINGLE, TensorParallel
from avmp.engine.parallel.shards import Shard, model_shards
from avmp.memory.backing.views import TORCH_DTYPES

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message says what is missing."""


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def read_config(path: Path) -> Any:
    """The transformers config of a checkpoint directory."""
    from transformers import AutoConfig

    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: missing config.json")
    rejected = (ValueError, KeyError, TypeError, AttributeError, *_config_errors())
    try:
        json.loads((path / "config.json").read_text())
        return AutoConfig.from_pretrained(str(path))
    except rejected as error:
        reason = " ".join(str(error).split())  # transformers' messages span lines
        raise CheckpointError(f"{path / 'config.json'}: {reason}") from None


def _config_errors() -> tuple[type[Exception], ...]:
    """What transformers raises for a config its dataclass validation rejects (a
    huggingface_hub type, absent from older versions)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, checked to exist."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            loaded = json.loads(index.read_text())
        except ValueError as error:
            raise CheckpointError(f"{index}: malformed index ({error})") from None
        weight_map = loaded.get("weight_map") if isinstance(loaded, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) for name in weight_map.values()
        ):
            raise CheckpointError(
                f"{index}: malformed index (no weight_map from tensor names to file names)"
            )
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (path / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{path}: missing weight file(s) listed in {INDEX_NAME}: {_few(missing)}"
            )
        return [path / name for name in files]
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(
        f"{path}: missing weights (no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors)"
    )


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: unreadable safetensors file ({error})") from None
    return tensors


def read_tensor_shards(model: HybridModel, files: list[Path]) -> dict[str, torch.Tensor]:
    """The text-model tensors of the files that ``model`` (one rank's) holds, under the
    names `text_model_tensors` gives them, each sliced to the rank's `Shard` as it is
    read; a tensor without a shard is read whole (it is replicated), the experts of
    other ranks not at all."""
    from safetensors import safe_open

    shards = model_shards(model)
    elsewhere = other_ranks_experts(model)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as reader:
                for stored in reader.keys():  # noqa: SIM118 (a safetensors reader: not iterable)
                    name = text_model_name(stored)
                    if name is None or elsewhere(name):
                        continue
                    shard = shards.get(name)
                    tensors[name] = (
                        reader.get_tensor(stored)
                        if shard is None
                        else _read_shard(reader.get_slice(stored), shard, name, file)
                    )
        except CheckpointError:
            raise
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: unreadable safetensors file ({error})") from None
    return tensors


def other_ranks_experts(model: HybridModel) -> Callable[[str], bool]:
    """Whether a checkpoint tensor belongs to an expert another rank holds."""
    slices = [
        (f"{name}.", module)
        for name, module in model.named_modules()
        if isinstance(module, ExpertSlice)
    ]

    def elsewhere(name: str) -> bool:
        for prefix, experts in slices:
            if name.startswith(prefix):
                index = name.removeprefix(prefix).split(".", 1)[0]
                return index.isdigit() and experts.is_elsewhere(int(index))
        return False

    return elsewhere


def _read_shard(tensor_slice: Any, shard: Shard, name: str, file: Path) -> torch.Tensor:
    """One tensor's shard, its full shape checked first (a mismatched tensor would
    slice without error)."""
    shape = tuple(tensor_slice.get_shape())
    if len(shape) <= shard.dim or shape[shard.dim] != shard.rows.full:
        raise CheckpointError(
            f"{file}: shape mismatch for {name}: checkpoint {shape}, the model's full "
            f"tensor has {shard.rows.full} along dimension {shard.dim}"
        )
    return shard.take(tensor_slice)


# Multimodal wrappers (Qwen3.5) keep the text model under ``model.language_model.``
# beside the vision tower (``model.visual.``); Qwen3-Next and Qwen3.5 checkpoints also
# hold multi-token-prediction layers (``mtp.``). The engine runs the text model and its
# next-token head only, so those are read and left out.
_TEXT_MODEL_PREFIX = "model.language_model."
_IGNORED_PREFIXES = ("model.visual.", "mtp.")


def text_model_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's text-model tensors under the names of a text-only model."""
    kept: dict[str, torch.Tensor] = {}
    for stored, value in tensors.items():
        name = text_model_name(stored)
        if name is not None:
            kept[name] = value
    return kept


def text_model_name(stored: str) -> str | None:
    """A checkpoint tensor's name in the text-only model (None: not part of it)."""
    if stored.startswith(_IGNORED_PREFIXES):
        return None
    if stored.startswith(_TEXT_MODEL_PREFIX):
        return "model." + stored.removeprefix(_TEXT_MODEL_PREFIX)
    return stored


def load_weights(model: HybridModel, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy checkpoint tensors into the model, checking names and shapes."""
    computed = set(model.computed_buffers)
    tensors = {n: t for n, t in tensors.items() if n.rpartition(".")[2] not in computed}
    expected = dict(model.state_dict())
    tied = set(model.tied_weights) if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [name for name in expected if name not in tensors and name not in tied]
    if missing:
        raise CheckpointError(f"{where}: missing tensors: {_few(missing)}")
    unexpected = [name for name in tensors if name not in expected]
    if unexpected:
        raise CheckpointError(
            f"{where}: tensors the {model.family} model does not have: {_few(unexpected)}"
        )
    for name, value in tensors.items():
        check_tensor(name, value, expected[name], where)
    model.load_state_dict(tensors, strict=False)
    model.tie_weights_if_needed()


def check_tensor(name: str, value: torch.Tensor, expected: torch.Tensor, where: Path) -> None:
    """One checkpoint tensor against the model's: same shape, floating point where the
    model's is (an integer tensor would be cast silently), and finite (NaN or infinite
    weights would generate garbage without an error)."""
    if tuple(value.shape) != tuple(expected.shape):
        raise CheckpointError(
            f"{where}: shape mismatch for {name}: checkpoint {tuple(value.shape)}, "
            f"model {tuple(expected.shape)}"
        )
    if expected.is_floating_point() and not value.is_floating_point():
        raise CheckpointError(
            f"{where}: {name} holds {str(value.dtype).removeprefix('torch.')} values; "
            "the model needs floating-point weights"
        )
    if value.is_floating_point() and not _all_finite(value):
        raise CheckpointError(f"{where}: {name} holds NaN or infinite values")


def _all_finite(value: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN or infinity (torch has no
    ``isfinite`` for the 8-bit float types: those are widened to float16 first, which
    holds every value they can)."""
    if value.element_size() == 1:
        value = value.to(torch.float16)
    return bool(torch.isfinite(value).all())


def load_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    tp: TensorParallel = SINGLE,
) -> HybridModel:
    """Build our model for a checkpoint directory and load its weights.

    Args:
        dtype: compute dtype; defaults to the checkpoint's ``dtype`` / ``torch_dtype``.
        tp: the rank to load for: its shard of every layer, read shard by shard.
    Raises:
        CheckpointError: missing config, weight files or tensors, a shape mismatch,
            integer, NaN or infinite weights, or (``dtype`` left out) a config dtype
            other than float32, bfloat16 or float16.
        ValueError: the model does not split over ``tp.size`` ranks (the message names
            the figure that does not divide).
    """
    path = Path(path).expanduser()
    config = read_config(path)
    cls = model_class(config.model_type)
    if dtype is None:
        dtype = config_dtype(config)
        if dtype not in TORCH_DTYPES.values():  # float8, float64: no cache format for them
            raise CheckpointError(
                f"{path / 'config.json'}: dtype {str(dtype).removeprefix('torch.')} is not "
                f"one the engine runs ({', '.join(TORCH_DTYPES)}); give one "
                "(--dtype, EngineConfig.dtype)"
            )
    files = weight_files(path)
    model = cls(config, tp)
    if tp.is_single:
        tensors = text_model_tensors(read_tensors(files))
    else:
        tensors = read_tensor_shards(model, files)
    load_weights(model, tensors, path)
    return model.to(device=device, dtype=dtype).eval()


def config_dtype(config: Any) -> torch.dtype:
    """The dtype a checkpoint's config asks for (float32 when it names none)."""
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    if isinstance(name, torch.dtype):
        return name
    return TORCH_DTYPES.get(str(name), torch.float32)
