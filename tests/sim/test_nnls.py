"""avmp.sim.nnls: non-negative least squares, as scipy.optimize.nnls solves it."""

from __future__ import annotations

import numpy as np
import pytest

from avmp.sim.nnls import nonnegative_least_squares


def test_nnls_finds_scipys_solution_and_never_goes_negative() -> None:
    scipy = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    for _ in range(300):
        rows, columns = int(rng.integers(3, 30)), int(rng.integers(1, 10))
        matrix = rng.normal(size=(rows, columns)) * rng.choice([1e-3, 1.0, 1e3], size=columns)
        targets = rng.normal(size=rows)
        ours, theirs = nonnegative_least_squares(matrix, targets), scipy.nnls(matrix, targets)[0]
        assert (ours >= 0).all()
        residual = np.linalg.norm(matrix @ ours - targets)
        assert residual <= np.linalg.norm(matrix @ theirs - targets) + 1e-9 * max(1.0, residual)


def test_nnls_recovers_a_nonnegative_truth_and_zeroes_what_would_go_negative() -> None:
    matrix = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [2.0, 1.0, 1.0]])
    assert nonnegative_least_squares(matrix, matrix @ [0.5, 2.0, 0.0]) == pytest.approx(
        [0.5, 2.0, 0.0], abs=1e-12
    )
    # unconstrained, the second column's coefficient would be -1
    targets = matrix @ np.array([1.0, -1.0, 0.5])
    solution = nonnegative_least_squares(matrix, targets)
    assert solution[1] == 0.0 and (solution >= 0).all()


@pytest.mark.parametrize(
    ("matrix", "targets"),
    [
        (np.ones((3, 2)), np.ones(2)),
        (np.ones(3), np.ones(3)),
        (np.full((2, 2), np.nan), np.ones(2)),
    ],
)
def test_nnls_refuses_shapes_that_do_not_match_and_values_that_are_not_finite(
    matrix: np.ndarray, targets: np.ndarray
) -> None:
    with pytest.raises(ValueError, match="need a|finite"):
        nonnegative_least_squares(matrix, targets)
