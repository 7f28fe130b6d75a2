"""benchmarks/skinny_gemm.py's CPU side: its --quick run (the GPU sweep's code under
Triton's interpreter, where Triton is installed) and the weight shapes it derives from the
zoo configs, checked against the engine's own nn.Linear modules (no Triton needed).

The script runs in a subprocess: importing triton in this process would stop the kernel
tests, later in the session, from switching Triton to its interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.common import REPO_ROOT, read_result

if importlib.util.find_spec("torch") is None:
    pytest.skip("the benchmark needs torch", allow_module_level=True)
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="the sweep needs triton")  # fmt: skip


def run_script(*argv: str, interpret: bool = False) -> str:
    """``python -m benchmarks.skinny_gemm ARGV`` from the repository root, as documented."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"),
                                                       os.environ.get("PYTHONPATH", "")])}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.skinny_gemm", *argv], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@needs_triton
def test_quick_run_sweeps_checks_and_saves_the_best_configs(tmp_path: Path) -> None:
    out = tmp_path / "skinny.json.gz"
    stdout = run_script("--device", "cpu", "--quick", "--out", str(out), interpret=True)
    result = read_result(out)
    cells = result["cells"]
    assert [(c["n"], c["k"], c["m"]) for c in cells] == [
        (40, 96, 1), (40, 96, 5), (24, 40, 1), (24, 40, 5)]
    for cell in cells:
        errors = [(t["config"], t["error"]) for t in cell["trials"] if "error" in t]
        assert cell["swept"] and not errors and cell["num_configs"] >= 4, errors[:3]
        assert {t["config"]["split_k"] for t in cell["trials"]} == {1, 2}  # both phases ran
        fastest = min(cell["trials"], key=lambda t: t["ms"])
        assert cell["best"] == fastest["config"]
        assert result["table"][f"{cell['n']}x{cell['k']}"][str(cell["m"])] == cell["best"]
        assert 0 < cell["best_rel_error"] <= 2e-2
        assert cell["speedup"] == pytest.approx(cell["cublas_ms"] / cell["best_ms"])
    for m in (1, 5):  # the whole-step table: up counted twice, down once
        step = 2 * cells[m == 5]["best_ms"] + cells[2 + (m == 5)]["best_ms"]
        assert f"| tiny | {m} | 3 | " in stdout and f"| {step:.3f} |" in stdout


def meta_model_shapes(name: str) -> Counter[tuple[int, int]]:
    """(out, in) of every nn.Linear of the engine's model, built on the meta device."""
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoConfig

    from avmp.engine.models import model_class
    from avmp.models.zoo import zoo_config

    raw = zoo_config(name)
    kwargs = {k: v for k, v in raw.items() if not k.startswith("_") and k != "model_type"}
    config = AutoConfig.for_model(raw["model_type"], **kwargs)
    with torch.device("meta"):
        model = model_class(config.model_type)(config)
    return Counter((m.out_features, m.in_features) for m in model.modules()
                   if isinstance(m, torch.nn.Linear))


@pytest.mark.slow  # ~7 s: transformers and the engine's model classes
def test_weight_shapes_are_the_engine_models_linear_layers() -> None:
    listed = json.loads(run_script("--list-linears"))
    for name in ("nemotron-h-8b", "granite-4.0-h-micro"):
        derived: Counter[tuple[int, int]] = Counter()
        for lin in listed:
            if lin["model"] == name:
                derived[lin["n"], lin["k"]] += lin["count"]
        assert derived == meta_model_shapes(name), name
