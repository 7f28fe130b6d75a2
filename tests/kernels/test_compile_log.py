"""CompileLog sees a Triton kernel compile once per specialisation (under the
interpreter on the CPU no kernel compiles, so this runs where Triton compiles)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from avmp.kernels.compile_log import CompileLog  # noqa: E402


class _Fn:
    def __init__(self, name: str) -> None:
        self.name = name


def test_summary_counts_each_kernel_slowest_first() -> None:
    """The hooks as Triton calls them (keywords), two kernels, three compilations."""
    log = CompileLog()
    for name, spec in (("a", "a(n: i32)"), ("b", "b(n: i32:16)"), ("a", "a(n: i32:16)")):
        assert log._before(repr=spec, key=None) is False  # Triton must go on compiling
        log._after(repr=spec, fn=_Fn(name), key=None)
    assert [c.kernel for c in log.compilations] == ["a", "b", "a"]
    assert all(c.seconds >= 0 for c in log.compilations)
    lines = log.summary().splitlines()
    assert lines[0].startswith("Triton compilations: 3")
    assert {line.split()[-1]: int(line.split()[2]) for line in lines[1:]} == {"a": 2, "b": 1}
    assert log.details().count("\n") == 2 and "b(n: i32:16)" in log.details()


def test_install_restores_the_hooks_it_replaced() -> None:
    from triton import knobs

    before = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
    with CompileLog() as log:
        assert knobs.runtime.jit_cache_hook == log._before
        with pytest.raises(RuntimeError, match="installed already"):
            log.install()
    assert (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook) == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_integer_argument_compiles_once_per_class() -> None:
    @triton.jit
    def _fill(out_ptr, n, BLOCK: tl.constexpr):  # noqa: N803
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, n, mask=offs < n)

    out = torch.zeros(64, dtype=torch.int32, device="cuda")
    with CompileLog() as log:
        for n in (3, 5, 16, 32, 1):  # 'other' twice, 'multiple of 16' twice, 'one'
            _fill[(1,)](out, n, BLOCK=64)
    torch.cuda.synchronize()
    assert [c.kernel.split(".")[-1] for c in log.compilations] == ["_fill"] * 3
    assert "_fill" in log.summary()


def test_specialisation_classes_follow_tritons_rules() -> None:
    from avmp.kernels.compile_log import specialisation_class as cls

    assert cls(1) != cls(2) == cls(3) != cls(32) == cls(48)
    assert cls(2**40)[2] == 64 and cls(7)[2] == 32
    assert cls(True) == ("const", True) and cls(None) == ("const", None)
    base = torch.zeros(8, dtype=torch.int64)
    assert cls(base[0:]) == cls(base[2:]) != cls(base[1:])  # 16-byte aligned or not
    assert cls(base.float()) != cls(base)


class _Param:
    def __init__(self, name: str) -> None:
        self.name = name


class _Kernel:
    """What the census reads of an interpreted kernel: its function and parameters."""

    def __init__(self) -> None:
        def kernel() -> None: ...

        self.fn = kernel
        self.params = [_Param("x_ptr"), _Param("n"), _Param("stride")]


def test_census_names_the_arguments_that_changed_class() -> None:
    from avmp.kernels.compile_log import SpecialisationCensus

    census, kernel = SpecialisationCensus(), _Kernel()
    buffer = torch.zeros(64, dtype=torch.int64)
    for offset, n in ((0, 5), (2, 7), (1, 5), (0, 32)):  # aligned, aligned, not, aligned
        census.record(kernel, (buffer[offset:], n, 16), {"BLOCK": 64, "grid": (1,)})
    name = next(iter(census.keys))
    assert census.calls[name] == 4
    assert len(census.keys[name]) == 3  # (aligned, other) twice, then two new keys
    assert census.varying(name) == ["x_ptr", "n"]
    assert "3 keys" in census.summary() and "varying: x_ptr, n" in census.summary()


def test_census_restores_the_interpreter_it_wrapped() -> None:
    from triton.runtime import interpreter

    from avmp.kernels.compile_log import SpecialisationCensus

    before = interpreter.InterpretedFunction.run
    with SpecialisationCensus() as census:
        assert interpreter.InterpretedFunction.run is not before
        with pytest.raises(RuntimeError, match="installed already"):
            census.install()
    assert interpreter.InterpretedFunction.run is before
