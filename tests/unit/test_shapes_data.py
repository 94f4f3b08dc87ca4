"""The synthetic shapes dataset: determinism, class balance and masks that cover the objects."""

from __future__ import annotations

import numpy as np
import torch

from app.eval import shapes


def test_same_seed_same_data_and_prefixes_agree():
    first = shapes.generate(seed=7, count=12)
    second = shapes.generate(seed=7, count=12)
    assert np.array_equal(first.images, second.images)
    assert np.array_equal(first.labels, second.labels)
    assert np.array_equal(first.masks, second.masks)
    prefix = shapes.generate(seed=7, count=5)
    assert np.array_equal(prefix.images, first.images[:5])
    window = shapes.generate(seed=7, count=4, start=6)
    assert np.array_equal(window.images, first.images[6:10])
    assert np.array_equal(window.masks, first.masks[6:10])
    other = shapes.generate(seed=8, count=12)
    assert not np.array_equal(other.images, first.images)


def test_shapes_and_types():
    data = shapes.generate(seed=0, count=60)
    size = shapes.IMAGE_SIZE
    assert data.images.shape == (60, size, size, 3) and data.images.dtype == np.uint8
    assert data.masks.shape == (60, size, size) and data.masks.dtype == bool
    assert data.labels.dtype == np.int64
    assert set(data.labels.tolist()) == set(range(len(shapes.SHAPE_CLASSES)))
    # textured backgrounds: no image is flat outside its object
    for image, mask in zip(data.images, data.masks, strict=True):
        assert image[~mask].std() > 3


def test_masks_cover_the_objects():
    """Every mask is one solid object of plausible size, and the image inside it is the object's
    single colour while the surroundings differ from it."""
    data = shapes.generate(seed=3, count=40)
    for image, mask in zip(data.images, data.masks, strict=True):
        area = int(mask.sum())
        assert 80 <= area <= 0.4 * mask.size
        # the object's colour: the mask interior (eroded by one pixel, away from antialiased edges)
        interior = mask.copy()
        interior[1:] &= mask[:-1]
        interior[:-1] &= mask[1:]
        interior[:, 1:] &= mask[:, :-1]
        interior[:, :-1] &= mask[:, 1:]
        inside = image[interior].astype(float)
        colour = np.median(inside, axis=0)
        # one flat colour, no texture, no clutter on top (a few thin-part pixels are antialiased)
        assert np.mean(np.linalg.norm(inside - colour, axis=1) < 1.0) > 0.9
        # a ring of pixels just outside the mask is mostly far from the object's colour
        grown = mask.copy()
        for _ in range(2):
            grown[1:] |= grown[:-1].copy()
            grown[:-1] |= grown[1:].copy()
            grown[:, 1:] |= grown[:, :-1].copy()
            grown[:, :-1] |= grown[:, 1:].copy()
        ring = grown & ~mask
        distance = np.linalg.norm(image[ring].astype(float) - colour, axis=1)
        assert np.mean(distance > 30) > 0.8
        # no object pixel lies outside the mask: pixels of the object's colour are in (or next to) it
        same_colour = np.linalg.norm(image.astype(float) - colour, axis=2) < 1.0
        assert (same_colour & ~grown).sum() <= 3


def test_torch_dataset_normalises_with_the_model_statistics():
    dataset = shapes.ShapesDataset(seed=5, count=4)
    image, label, mask = dataset[2]
    raw = shapes.generate(seed=5, count=4)
    expected = (torch.from_numpy(raw.images[2]).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert torch.allclose(image, expected)
    assert label == int(raw.labels[2])
    assert torch.equal(mask, torch.from_numpy(raw.masks[2]))
    assert len(dataset) == 4


def test_decoys_keep_clear_of_the_object():
    """Decoys (rings, bars, crescents) sit at least the pointing tolerance plus one pixel away from
    the object and from each other, and nearly every image gets at least one."""
    placed = 0
    for index in range(300):
        rng = np.random.default_rng([11, index])
        pose = shapes._pose(rng, shapes.IMAGE_SIZE, shapes._OBJECT_RADIUS)
        decoys = shapes._decoy_poses(rng, pose, shapes.IMAGE_SIZE)
        assert len(decoys) <= shapes._DECOYS[1]
        placed += bool(decoys)
        shapes_here = [pose, *decoys]
        for i, (x1, y1, r1) in enumerate(shapes_here):
            assert r1 + 1 <= x1 <= shapes.IMAGE_SIZE - r1 - 1 and r1 + 1 <= y1 <= shapes.IMAGE_SIZE - r1 - 1
            for x2, y2, r2 in shapes_here[i + 1 :]:
                assert np.hypot(x1 - x2, y1 - y2) >= shapes._EXTENT * (r1 + r2) + 5.0 - 1e-9
    assert placed >= 0.9 * 300


def test_every_shape_stays_within_its_extent():
    """The placement rule assumes no object or decoy reaches beyond _EXTENT radii from its centre."""
    size = shapes.IMAGE_SIZE
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    pose = (32.0, 32.0, 13.0)
    for index in range(24):
        rng = np.random.default_rng([12, index])
        alphas = [shapes._object_alpha(rng, index % len(shapes.SHAPE_CLASSES), pose, size)]
        alphas.append(shapes._decoy_alpha(rng, shapes.DECOY_SHAPES[index % 3], pose, size))
        for alpha in alphas:
            covered = alpha > 0
            assert covered.sum() > 50
            distance = np.hypot(xs - pose[0], ys - pose[1])[covered]
            assert distance.max() <= shapes._EXTENT * pose[2] + 1.0


def test_decoys_are_drawn_in_object_and_empty_images():
    """Images carry shapes besides the object: large same-colour regions outside the object mask."""
    data = shapes.generate(seed=4, count=30)
    empty = shapes.generate_empty(seed=4, count=30)
    with_decoy = 0
    for image, mask in zip(data.images, data.masks, strict=True):
        base = np.median(image[~mask].reshape(-1, 3).astype(float), axis=0)
        far = np.linalg.norm(image.astype(float) - base, axis=2) > 80
        with_decoy += (far & ~mask).sum() > 40
    assert with_decoy >= 20
    empty_with_decoy = sum(
        (np.linalg.norm(im.astype(float) - np.median(im.reshape(-1, 3), axis=0), axis=2) > 80).sum() > 40
        for im in empty
    )
    assert empty_with_decoy >= 20


def test_pair_images_hold_two_separate_objects_of_different_classes():
    data = shapes.generate_pairs(seed=5, count=40)
    assert data.images.shape == (40, 64, 64, 3) and data.images.dtype == np.uint8
    assert data.labels.shape == (40, 2) and data.masks.shape == (40, 2, 64, 64)
    ys, xs = np.mgrid[0:64, 0:64]
    for labels, masks in zip(data.labels, data.masks, strict=True):
        assert labels[0] != labels[1]
        assert all(0 <= label < len(shapes.SHAPE_CLASSES) for label in labels)
        assert masks[0].sum() > 20 and masks[1].sum() > 20
        # every pixel of one object is more than twice the 4 px pointing tolerance from the other
        first = np.stack([ys[masks[0]], xs[masks[0]]], axis=1)[:, None, :]
        second = np.stack([ys[masks[1]], xs[masks[1]]], axis=1)[None, :, :]
        assert np.sqrt(((first - second) ** 2).sum(-1)).min() > 2 * 4.0
    # deterministic, and a prefix of a larger set; its own stream, apart from the one-object images
    again = shapes.generate_pairs(seed=5, count=10, start=30)
    np.testing.assert_array_equal(again.images, data.images[30:])
    np.testing.assert_array_equal(again.masks, data.masks[30:])
    assert not np.array_equal(shapes.generate(seed=5, count=1).images[0], data.images[0])
