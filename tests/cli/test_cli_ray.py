"""`avmp bench --ray ADDRESS` against a real Ray cluster: a head node started here on
127.0.0.1 with two worker CPUs, the CLI run as a user would run it (its own process,
bounded in time), and its cells compared with those of a local run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from avmp.bench.sweep import SweepGrid, run_sweep

pytest.importorskip("ray")

START_TIMEOUT_S = 90
RUN_TIMEOUT_S = 300
# Ray resolves 127.0.0.1 to the machine's address and listens on every interface, except
# when clusters are switched off, as on a laptop; then every process binds 127.0.0.1.
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
GRID_ARGS = ["--quick", "--models", "jamba-1.5-mini", "--budgets", "1GiB", "--seeds", "1",
             "--workloads", "shift", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.5)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Kill the head's process group (the head, its raylet, GCS and workers: all started
    in the session `ray start` opened) and wait, boundedly, until none is left."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """``127.0.0.1:PORT`` of a Ray head with 2 CPUs, no dashboard, stopped afterwards."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="avmp-ray-")  # short: Ray's socket paths must fit
    log = Path(temp_dir) / "head.log"
    command = [
        shutil.which("ray") or "ray", "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
        "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                   env={**os.environ, **LOOPBACK_ONLY}, start_new_session=True)
    try:
        if not _wait_for_port(port, process, START_TIMEOUT_S):
            pytest.fail(f"the Ray head did not start within {START_TIMEOUT_S} s:\n"
                        + log.read_text(errors="replace")[-2000:])
        yield f"127.0.0.1:{port}"
    finally:
        _stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cells(directory: Path) -> dict[str, dict[str, Any]]:
    """Saved cells without what differs run to run (cost, measured CPU time)."""
    cells = {}
    for path in sorted((directory / "cells").glob("*.json")):
        record = json.loads(path.read_text())
        record.pop("cost")
        record["result"] = {k: v for k, v in record["result"].items()
                            if not k.startswith("measured_")}
        cells[path.stem] = record
    return cells


def test_bench_on_a_ray_cluster_saves_what_a_local_run_saves(ray_head: str,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "ray"
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from avmp.cli import main; sys.exit(main())",
         "bench", "--out", str(out), "--ray", ray_head, *GRID_ARGS],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
        env={**os.environ, **LOOPBACK_ONLY},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 cells (6 simulated now" in done.stdout
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert runs[-1]["ray"] == ray_head
    grid = SweepGrid(workloads=("shift",), models=("jamba-1.5-mini",), budgets_bytes=(1 << 30,),
                     profiles=("h200",),  # Jamba's 96 GiB of weights need 141 GB
                     seeds=(0,), num_requests=(("shift", 48),))
    run_sweep(grid, tmp_path / "local", workers=1, progress=False)
    assert _cells(out) == _cells(tmp_path / "local")
    assert len(_cells(out)) == 6  # one per layout
