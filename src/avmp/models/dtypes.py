"""SSM-state dtypes by name, and each family's default as the peer engines ship it.

The state's dtype decides how many requests fit (fp32 doubles every SSM state), so a
comparison with vLLM or SGLang is only fair at the dtype a user of theirs gets. Sources
(read in the peers' code, see docs/design-memory.md, "SSM-state dtype defaults"):

- vLLM: ``mamba_ssm_cache_dtype`` defaults to the model's dtype, except where a model's
  config sets ``DEFAULT_MAMBA_SSM_CACHE_DTYPE``; Nemotron-H sets ``float32``
  (``vllm/model_executor/models/config.py``).
- SGLang: Mamba2 state (its ``sglang/srt/configs/mamba_utils.py``, for NemotronH,
  FalconH1, Qwen3Next and the other Mamba2 hybrids) is ``float32`` by default.

``auto`` takes fp32 where either peer keeps the state in fp32 by default, bf16 (the
checkpoints' dtype) elsewhere. Nothing here imports torch.
"""

from __future__ import annotations

SSM_DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
_ALIASES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}
# family -> (vLLM's default, SGLang's default); "model" = the checkpoint's dtype (bf16).
PEER_SSM_DTYPES: dict[str, tuple[str, str]] = {
    "nemotron_h": ("float32", "float32"),
    "granitemoehybrid": ("model", "float32"),
    "bamba": ("model", "float32"),
    "falcon_h1": ("model", "float32"),
    "zamba2": ("model", "float32"),
    "mamba2": ("model", "float32"),
    "qwen3_next": ("model", "float32"),
    # Qwen3.5 / 3.6: the same Gated DeltaNet state as Qwen3-Next; taken to follow its
    # peers' defaults (not read in their code for these families)
    "qwen3_5": ("model", "float32"),
    "qwen3_5_moe": ("model", "float32"),
    "jamba": ("model", "model"),
    "minimax": ("model", "model"),
    # no SSM state at all: its short convolutions keep a conv window in the model's dtype
    "lfm2": ("model", "model"),
}
MODEL_DTYPE = "bfloat16"  # every zoo checkpoint ships bf16 weights


def default_ssm_dtype(family: str) -> str:
    """The SSM-state dtype ``auto`` means for ``family``: fp32 where vLLM or SGLang
    keeps it in fp32 by default, else the model's dtype (bf16); unknown families too."""
    peers = PEER_SSM_DTYPES.get(family, ("model", "model"))
    return "float32" if "float32" in peers else MODEL_DTYPE


def ssm_dtype_name(choice: str) -> str | None:
    """The dtype name of an ``--ssm-dtype`` choice (``bf16`` -> ``bfloat16``), or None
    for ``auto`` (the family's default, known once the config is read).

    Raises:
        ValueError: not one of `SSM_DTYPE_CHOICES` (or a full dtype name).
    """
    text = str(choice).strip().lower()
    if text == "auto":
        return None
    name = _ALIASES.get(text)
    if name is None:
        raise ValueError(
            f"--ssm-dtype must be one of {', '.join(SSM_DTYPE_CHOICES)}, got {choice!r}"
        )
    return name
