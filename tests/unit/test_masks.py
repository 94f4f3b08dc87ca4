import pytest
import torch

from app.engine.masks import mask_matrix, mask_supports


def test_gaussian_centre_mask_is_the_paper_kernel():
    m = mask_matrix(5, 5, "gaussian", dtype=torch.float64)
    k = 2 * 5 + 2
    grid = m[k].reshape(5, 5)
    expected = torch.tensor(
        [[1 / 16, 1 / 8, 1 / 16], [1 / 8, 1 / 4, 1 / 8], [1 / 16, 1 / 8, 1 / 16]], dtype=torch.float64
    )
    assert torch.equal(grid[1:4, 1:4], expected)
    assert grid.sum() == pytest.approx(1.0)
    assert (grid[0] == 0).all() and (grid[4] == 0).all()


def test_border_masks_are_truncated_not_renormalised():
    m = mask_matrix(4, 6, "gaussian", dtype=torch.float64)
    corner = m[0].reshape(4, 6)
    assert (
        corner[0, 0] == 1 / 4 and corner[0, 1] == 1 / 8 and corner[1, 0] == 1 / 8 and corner[1, 1] == 1 / 16
    )
    assert corner.sum() == pytest.approx(1 / 4 + 1 / 8 + 1 / 8 + 1 / 16)
    edge = m[3].reshape(4, 6)  # row 0, column 3
    assert edge.sum() == pytest.approx(0.75)
    assert (edge != 0).sum() == 6


def test_row_major_order_on_non_square_grid():
    h, w = 3, 5
    m = mask_matrix(h, w, "dirac", dtype=torch.float64)
    assert torch.equal(m, torch.eye(h * w, dtype=torch.float64))
    g = mask_matrix(h, w, "gaussian", dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            centre = g[i * w + j].reshape(h, w)
            assert centre[i, j] == 1 / 4, (i, j)
            assert centre.argmax() == i * w + j


def test_supports_match_dense_masks():
    for kernel, size in (("gaussian", 9), ("dirac", 1)):
        indices, weights = mask_supports(4, 6, kernel)
        assert indices.shape == (24, size)
        dense = torch.zeros(24, 24, dtype=torch.float64)
        dense.scatter_add_(1, indices, weights)
        assert torch.equal(dense, mask_matrix(4, 6, kernel, dtype=torch.float64))


def test_unknown_kernel_and_empty_grid_rejected():
    with pytest.raises(ValueError, match="unknown kernel"):
        mask_matrix(3, 3, "box")
    with pytest.raises(ValueError):
        mask_matrix(0, 3)
