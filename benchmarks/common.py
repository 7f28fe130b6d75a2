"""What the benchmark scripts share, each defined once: the one format their results are
saved in, paths as results record them, GPU warm-up, CUDA-event and wall-clock timing, the
device-to-device copy bandwidth that memory-bound figures are compared with, and the
relative error a kernel is checked with.

Results are compact JSON, gzip-compressed when the file name ends in ``.gz`` (the
committed ones, under ``benchmarks/results/``). Files that the library itself reads
(step-time calibrations for ``avmp bench --calibration``, the allocator-call costs the
simulator loads) keep a plain ``.json`` name, which `write_result` writes uncompressed.

torch is imported inside the GPU helpers only, so the report side of every script (tables
drawn from saved results) and the tests that rebuild the docs from them run without a GPU.
"""

from __future__ import annotations

import gzip
import json
import statistics
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
_GZIP_MAGIC = b"\x1f\x8b"

# Median milliseconds of one call of a function (CUDA events, do_bench, or wall time on CPU).
Timer = Callable[[Callable[[], object]], float]


# -- results ---------------------------------------------------------------------------------


def write_result(path: Path, result: Any) -> Path:
    """Save ``result`` as compact JSON, gzip-compressed when ``path`` ends in ``.gz``.

    Written whole to a temporary file then renamed, so a run killed mid-write leaves the
    previous valid file; the gzip header carries no time stamp, so the same result gives
    the same bytes (a rerun with unchanged figures is no diff).
    """
    data = (json.dumps(result, separators=(",", ":")) + "\n").encode()
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def read_result(path: Path) -> Any:
    """A result saved by `write_result` (gzip or not, whatever its name says), or an
    older indented JSON file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not (gzip-compressed) JSON; the message names it.
    """
    data = Path(path).read_bytes()
    try:
        if data[:2] == _GZIP_MAGIC:
            data = gzip.decompress(data)
        return json.loads(data)
    except (OSError, EOFError, zlib.error, ValueError) as error:  # ValueError: bad JSON/UTF-8
        raise ValueError(f"{path}: not a benchmark result ({error})") from None


def measure_or_redraw(
    args: Any, script: str, measure: Callable[[], Any], draw: Callable[[Any], str]
) -> int:
    """A GPU benchmark's main: with ``args.markdown`` (a saved result) print ``draw`` of it,
    no GPU needed (a missing or unreadable file: one line naming it, exit 1); otherwise
    ``measure()`` on the GPU (without one: one line naming ``script``, exit 1), saved to
    ``args.out`` when given, then drawn."""
    if args.markdown:
        try:
            result = read_result(Path(args.markdown))
        except FileNotFoundError:
            raise SystemExit(f"{script}: no such results file: {args.markdown}") from None
        except ValueError as error:  # names the file
            raise SystemExit(f"{script}: {error}") from None
        print(draw(result))
        return 0
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU")
    result = measure()
    if args.out:
        print(f"wrote {write_result(Path(args.out), result)}")
    print(draw(result))
    return 0


def gpu_profile(device_name: str) -> str:
    """The simulator's GPU profile (`avmp.sim.timing.GPU_PROFILES`) of a CUDA device
    name, e.g. ``NVIDIA H200`` -> ``h200``; ``h100`` when the name is not one of them."""
    name = device_name.upper()
    for key, profile in (("H200", "h200"), ("H100", "h100"), ("A100", "a100"), ("3060", "rtx3060")):
        if key in name:
            return profile
    return "h100"


def repo_path(path: Path | str) -> str:
    """``path`` as a result records it: relative to the repository when inside it, else
    its file name alone (an absolute path names one machine's directories, nothing a
    reader elsewhere can open)."""
    resolved = Path(path).resolve()
    if resolved.is_relative_to(REPO_ROOT):
        return resolved.relative_to(REPO_ROOT).as_posix()
    return resolved.name


def save_figure(fig: Any, path: Path) -> None:
    """Lay out a matplotlib figure and write it to ``path`` (its folder made if absent)."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# -- GPU measurement -----------------------------------------------------------------------


def warm_up_gpu(seconds: float = 1.0) -> None:
    """Bring the clocks up before the first timing: bf16 matrix products for ~seconds."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def tuning_device() -> tuple[Any, int]:
    """The CUDA device a launch-tile sweep runs on and the most shared memory one program
    may opt in to (227 KiB on an H100 or H200; ROCm lacks the opt-in figure, so the plain
    per-block one); a ValueError when no CUDA GPU is visible."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError("needs a CUDA GPU (none is visible)")
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    return device, getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block)


def event_ms(run: Callable[[], object], repeats: int = 10, warmup: int = 2) -> float:
    """Median device time of ``run`` in milliseconds, CUDA events around each call."""
    import torch

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_us(fn: Callable[[int], object], calls: int, reps: int = 20) -> float:
    """Median microseconds per call of ``fn(i)``, ``calls`` calls (i = 0, 1, ...)
    captured in one CUDA graph (after two warm-up calls on a side stream) and the graph
    replayed ``reps`` times, CUDA events around each replay."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(2):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def wall_ms(run: Callable[[], object], repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``run`` in milliseconds (the CPU's timer)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def wall_timer(warmup: int, repeats: int) -> Timer:
    """`wall_ms` as a `Timer`: the timer of a run on the CPU (under Triton's interpreter)."""
    return lambda fn: wall_ms(fn, repeats=repeats, warmup=warmup)


def copy_bytes_per_s(
    device: torch.device | str, num_bytes: int, timer: Timer | None = None
) -> float:
    """Device-to-device copy bandwidth of one ``num_bytes`` buffer, bytes read plus
    written per second: the ceiling a memory-bound kernel is compared with.

    Args:
        timer: median milliseconds of one copy; CUDA events (`event_ms`) by default, so
            a run on the CPU passes its own (wall time).
    """
    import torch

    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = (timer or event_ms)(lambda: dst.copy_(src))
    return 2 * num_bytes / ms * 1e3


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    out64, ref64 = out.double(), ref.double()
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))
