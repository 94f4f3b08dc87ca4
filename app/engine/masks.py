"""ViT-ReciproCAM spatial masks on a patch grid.

One mask per patch position ``k = i * w + j`` (row-major), each a weight ``M[k, q]`` for every
patch ``q``. The Gaussian kernel is the 3x3 kernel of the paper centred at ``(i, j)``; cells that
fall outside the grid are dropped and border masks are not renormalised. The Dirac kernel keeps
the centre cell only.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from app.engine.options import KERNELS, Kernel

GAUSSIAN_3X3: tuple[tuple[float, float, float], ...] = (
    (1 / 16, 1 / 8, 1 / 16),
    (1 / 8, 1 / 4, 1 / 8),
    (1 / 16, 1 / 8, 1 / 16),
)


def kernel_weights(kernel: Kernel) -> torch.Tensor:
    """The kernel as a (3, 3) float64 tensor, centre at [1, 1]."""
    if kernel == "gaussian":
        return torch.tensor(GAUSSIAN_3X3, dtype=torch.float64)
    if kernel == "dirac":
        weights = torch.zeros(3, 3, dtype=torch.float64)
        weights[1, 1] = 1.0
        return weights
    raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")


@lru_cache(maxsize=64)
def _mask_matrix_f64(height: int, width: int, kernel: Kernel) -> torch.Tensor:
    weights = kernel_weights(kernel)
    n = height * width
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for i in range(height):
        for j in range(width):
            k = i * width + j
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    ii, jj = i + di, j + dj
                    weight = float(weights[di + 1, dj + 1])
                    if weight != 0.0 and 0 <= ii < height and 0 <= jj < width:
                        matrix[k, ii * width + jj] = weight
    matrix.requires_grad_(False)
    return matrix


def mask_matrix(
    height: int,
    width: int,
    kernel: Kernel = "gaussian",
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The (n, n) matrix ``M[k, q]`` for an ``height x width`` patch grid, n = height * width."""
    if height < 1 or width < 1:
        raise ValueError(f"patch grid must be at least 1x1, got {height}x{width}")
    return _mask_matrix_f64(height, width, kernel).to(dtype=dtype, device=device)


@lru_cache(maxsize=64)
def mask_supports(height: int, width: int, kernel: Kernel = "gaussian") -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse form of the masks: ``(indices, weights)``, each of shape (n, S).

    ``S`` is the largest support (9 for gaussian, 1 for dirac, capped by the grid). Row ``k`` lists
    the patch indices where mask ``k`` is non-zero in ascending order, then pads with index 0 and
    weight 0. Padding entries have weight exactly 0.
    """
    matrix = _mask_matrix_f64(height, width, kernel)
    nonzero = matrix != 0
    support = int(nonzero.sum(dim=1).max())
    n = height * width
    indices = torch.zeros(n, support, dtype=torch.long)
    weights = torch.zeros(n, support, dtype=torch.float64)
    for k in range(n):
        cols = torch.nonzero(nonzero[k]).flatten()
        indices[k, : cols.numel()] = cols
        weights[k, : cols.numel()] = matrix[k, cols]
    return indices, weights
