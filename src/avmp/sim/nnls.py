"""Non-negative least squares in numpy: the physical form of a step-time calibration
fits with it (`avmp.sim.timing`), and the simulator's core does not depend on scipy."""

from __future__ import annotations

import numpy as np


def nonnegative_least_squares(matrix: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``x >= 0`` minimising ``|matrix @ x - targets|``: Lawson and Hanson's active-set
    method (Solving Least Squares Problems, 1974, ch. 23), as scipy.optimize.nnls.

    A column moves into the passive set (free to be positive) while the gradient says
    that raising it lowers the residual; whenever the unconstrained solution over the
    passive set turns a coefficient negative, the step is cut back to where the first
    one reaches 0 and that column leaves the set. For a few columns (a calibration has
    about ten) this ends in a few dozen least-squares solves.

    Args:
        matrix: ``[N, K]``.
        targets: ``[N]``.

    Returns:
        ``[K]`` coefficients, each >= 0.

    Raises:
        ValueError: shapes that do not match, or values that are not finite.
    """
    matrix = np.asarray(matrix, dtype=float)
    targets = np.asarray(targets, dtype=float)
    if matrix.ndim != 2 or targets.shape != (matrix.shape[0],):
        raise ValueError(
            f"need a [N, K] matrix and [N] targets, got {matrix.shape} and {targets.shape}"
        )
    if not (np.isfinite(matrix).all() and np.isfinite(targets).all()):
        raise ValueError("non-negative least squares needs finite values")
    num_columns = matrix.shape[1]
    solution = np.zeros(num_columns)
    passive = np.zeros(num_columns, dtype=bool)
    tolerance = 10 * np.finfo(float).eps * max(matrix.shape) * max(1.0, np.abs(matrix).sum(0).max())
    gradient = matrix.T @ targets
    for _ in range(3 * num_columns + 10):
        free = np.where(passive, -np.inf, gradient)
        if passive.all() or free.max() <= tolerance:
            break
        passive[int(free.argmax())] = True
        solution, passive = _feasible_step(matrix, targets, solution, passive)
        gradient = matrix.T @ (targets - matrix @ solution)
    return solution


def _feasible_step(
    matrix: np.ndarray, targets: np.ndarray, solution: np.ndarray, passive: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Lawson and Hanson's inner loop: the least-squares solution over the passive
    columns, cut back towards ``solution`` (and the columns that reach 0 dropped from the
    passive set) until every passive coefficient is positive."""
    passive = passive.copy()
    while True:
        trial = np.zeros_like(solution)
        trial[passive] = np.linalg.lstsq(matrix[:, passive], targets, rcond=None)[0]
        if passive.any() and trial[passive].min() > 0:
            return trial, passive
        negative = passive & (trial <= 0)
        if not negative.any():  # nothing passive left
            return trial, passive
        steps = np.full_like(solution, np.inf)
        steps[negative] = solution[negative] / (solution[negative] - trial[negative])
        first = int(steps.argmin())
        solution = solution + steps[first] * (trial - solution)
        solution[first] = 0.0  # exactly, where rounding would leave it a hair either side
        passive &= solution > 0
        solution[~passive] = 0.0
