"""Model cache geometry: what each layer of a hybrid model caches, in bytes."""

from __future__ import annotations

from avmp.models.dtypes import (
    PEER_SSM_DTYPES,
    SSM_DTYPE_CHOICES,
    default_ssm_dtype,
    ssm_dtype_name,
)
from avmp.models.geometry import (
    AttentionLayer,
    CacheTensor,
    ConvColumns,
    LayerKind,
    ModelGeometry,
    ParallelDims,
    RecurrentLayer,
    dtype_bytes,
)
from avmp.models.hf import SUPPORTED_MODEL_TYPES, ConfigError, geometry_from_config, load_config
from avmp.models.zoo import resolve_model, zoo_config, zoo_names

__all__ = [
    "PEER_SSM_DTYPES",
    "SSM_DTYPE_CHOICES",
    "SUPPORTED_MODEL_TYPES",
    "AttentionLayer",
    "CacheTensor",
    "ConfigError",
    "ConvColumns",
    "LayerKind",
    "ModelGeometry",
    "ParallelDims",
    "RecurrentLayer",
    "default_ssm_dtype",
    "dtype_bytes",
    "geometry_from_config",
    "load_config",
    "resolve_model",
    "ssm_dtype_name",
    "zoo_config",
    "zoo_names",
]
