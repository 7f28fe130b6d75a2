"""The bundled zoo: published ``config.json`` files under short names.

Each file in ``zoo/`` is a model's published config, written from recalled published
values (nothing is downloaded), plus two keys of ours: ``_avmp_source`` (which config it
stands for, and what its cache dimensions were checked against) and ``_avmp_confirmed``:
true where the cache geometry was checked against an independent source (the model
family's transformers defaults or documentation, or the project's reference notes),
false where a figure rests on recall alone. `avmp plan` says so for the latter.
"""

from __future__ import annotations

import difflib
import json
import os
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from avmp.models.dtypes import default_ssm_dtype, ssm_dtype_name
from avmp.models.geometry import ConvColumns, ModelGeometry
from avmp.models.hf import ConfigError, geometry_from_config

_ZOO_PACKAGE = "avmp.models"
_ZOO_DIR = "zoo"


@cache
def _zoo_files() -> dict[str, str]:
    """Short name -> file name, read once: the zoo ships inside the package."""
    folder = resources.files(_ZOO_PACKAGE).joinpath(_ZOO_DIR)
    return {
        entry.name.removesuffix(".json"): entry.name
        for entry in folder.iterdir()
        if entry.name.endswith(".json")
    }


def zoo_names() -> list[str]:
    """Short names of every bundled model, sorted."""
    return sorted(_zoo_files())


def _unknown(name: str) -> ConfigError:
    """Neither a zoo name nor an existing path: for a name written as a path
    (``./ckpt``, ``config.json``), that no such file exists; else the zoo names it may
    mean (a typo, or the start of a family's names) and all of them."""
    if _looks_like_path(name):
        return ConfigError(
            f"{name}: no such file or directory (expected a zoo name, a config.json path "
            "or a checkpoint directory)"
        )
    names = zoo_names()
    close = [n for n in names if name and n.startswith(name.lower())]
    close = close or difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.8)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return ConfigError(f"unknown model {name!r}{hint}; known: {', '.join(names)}")


def _looks_like_path(name: str) -> bool:
    """Written as a path: zoo names hold no separator and do not end in ``.json``."""
    return name.startswith((".", "~")) or name.endswith(".json") or "/" in name or os.sep in name


def zoo_config(name: str) -> dict[str, Any]:
    """A fresh copy of a bundled config (case-insensitive short name).

    Raises:
        ConfigError: no such zoo entry.
    """
    file_name = _zoo_files().get(name.lower())
    if file_name is None:
        raise _unknown(name)
    text = resources.files(_ZOO_PACKAGE).joinpath(_ZOO_DIR, file_name).read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def resolve_model(
    name_or_path: str,
    *,
    ssm_dtype: str = "bfloat16",
    conv_columns: str | ConvColumns = "vllm",
    kv_dtype: str = "bfloat16",
) -> ModelGeometry:
    """Geometry of a zoo model (short name, case-insensitive) or of a ``config.json``
    path / checkpoint directory.

    Args:
        ssm_dtype: a dtype name, an alias (``bf16``, ``fp16``, ``fp32``) or ``auto``:
            the family's default as vLLM and SGLang ship it (`default_ssm_dtype`).

    Raises:
        ConfigError: neither a zoo name nor an existing path, a bad config, or an
            unknown SSM dtype.
    """
    try:
        dtype = ssm_dtype_name(ssm_dtype)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    options: dict[str, Any] = {
        "ssm_dtype": dtype or "bfloat16",
        "conv_columns": conv_columns,
        "kv_dtype": kv_dtype,
    }
    geometry = _read(name_or_path, options)
    if dtype is None and default_ssm_dtype(geometry.family) != options["ssm_dtype"]:
        options["ssm_dtype"] = default_ssm_dtype(geometry.family)
        geometry = _read(name_or_path, options)  # the family is known only once read
    return geometry


def _read(name_or_path: str, options: dict[str, Any]) -> ModelGeometry:
    if name_or_path.lower() in _zoo_files():
        short = name_or_path.lower()
        return geometry_from_config(zoo_config(short), name=short, **options)
    path = Path(name_or_path).expanduser()
    if name_or_path.strip() and path.exists():  # Path("") is the working directory
        return geometry_from_config(path, **options)
    raise _unknown(name_or_path)
