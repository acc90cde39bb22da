import numpy as np
import pytest
from scipy import ndimage

from unet_core import instances_from_binary, weight_map
from unet_core.weights import class_balance, separate_touching


def brute_force_weight_map(labels, w0=10.0, sigma=5.0, spacing=None):
    """The definition: one Euclidean distance transform per cell, two smallest per pixel."""
    weights = class_balance(labels)
    ids = [i for i in np.unique(labels) if i > 0]
    if len(ids) < 2 or w0 == 0:
        return weights
    distances = np.stack([ndimage.distance_transform_edt(labels != i, sampling=spacing) for i in ids])
    distances.sort(axis=0)
    background = labels == 0
    border = w0 * np.exp(-((distances[0] + distances[1]) ** 2) / (2 * sigma**2))
    weights[background] += border[background].astype(np.float32)
    return weights


def random_instances(shape, n, rng):
    seeds = np.zeros(shape, np.int32)
    idx = tuple(rng.integers(0, s, n) for s in shape)
    seeds[idx] = np.arange(1, n + 1)
    distance, (indices) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    labels = seeds[tuple(indices)]
    labels[distance > rng.uniform(3, 8)] = 0
    labels[ndimage.morphological_gradient(labels, size=3) > 0] = 0  # gaps between touching cells
    return labels


@pytest.mark.parametrize("shape,spacing", [((64, 80), None), ((20, 40, 36), None), ((20, 40, 36), (3.0, 1.0, 1.0))])
def test_equals_brute_force_on_random_instances(shape, spacing, rng):
    for n in (2, 7, 25):
        labels = random_instances(shape, n, rng)
        expected = brute_force_weight_map(labels, spacing=spacing)
        np.testing.assert_allclose(weight_map(labels, spacing=spacing), expected, atol=1e-4)


def test_equals_brute_force_on_isbi_slices(isbi_labels):
    for index in (0, 15, 29):
        labels = instances_from_binary(isbi_labels[index])
        np.testing.assert_allclose(weight_map(labels), brute_force_weight_map(labels), atol=1e-4)


def test_equals_brute_force_on_isbi_3d_with_spacing(isbi_labels):
    labels = instances_from_binary(isbi_labels[:4, :96, :96])
    spacing = (50.0 / 4, 1.0, 1.0)
    np.testing.assert_allclose(weight_map(labels, spacing=spacing), brute_force_weight_map(labels, spacing=spacing),
                               atol=1e-4)


def test_class_balance_and_small_cases():
    labels = np.zeros((4, 4), int)
    labels[:, :1] = 1  # one cell: no border term, only class balance
    w = weight_map(labels)
    # N = 16, K = 2: cell pixels 16 / (2 * 4) = 2, background 16 / (2 * 12)
    assert w[0, 0] == pytest.approx(2.0)
    assert w[0, 3] == pytest.approx(16 / 24)
    assert np.allclose(weight_map(np.zeros((5, 5), int)), 1.0)


def test_border_between_two_cells_hand_computed():
    labels = np.zeros((1, 5), int)
    labels[0, 0] = 1
    labels[0, 4] = 2
    w = weight_map(labels, w0=10, sigma=5)
    # pixel x=2: d1 = d2 = 2 -> 10 exp(-16/50); class term 5 / (2 * 3)
    assert w[0, 2] == pytest.approx(5 / 6 + 10 * np.exp(-16 / 50), rel=1e-6)
    assert w[0, 0] == pytest.approx(5 / 4)


def test_instances_from_binary_uses_4_connectivity():
    binary = np.array([[255, 0, 0], [0, 255, 255], [0, 0, 255]])
    labels = instances_from_binary(binary)
    assert labels.max() == 2
    assert labels[0, 0] != labels[1, 1]
    volume = np.zeros((2, 2, 2), np.uint8)
    volume[0, 0, 0] = volume[1, 1, 1] = 1
    assert instances_from_binary(volume).max() == 2


@pytest.mark.parametrize(
    "labels,message",
    [
        (np.zeros((4, 4), np.float32), "integer dtype"),
        (np.full((4, 4), -1), ">= 0"),
        (np.zeros(4, int), "2D .* or 3D"),
        (np.zeros((2, 2, 2, 2), int), "2D .* or 3D"),
        (np.zeros((4, 4), bool), "boolean mask"),
    ],
)
def test_bad_labels_raise(labels, message):
    with pytest.raises(ValueError, match=message):
        weight_map(labels)


def test_bad_spacing_and_parameters_raise():
    with pytest.raises(ValueError, match="spacing"):
        weight_map(np.zeros((4, 4), int), spacing=(1.0,))
    with pytest.raises(ValueError, match="sigma"):
        weight_map(np.zeros((4, 4), int), sigma=0)


def _brute_force_contacts(labels):
    """Voxels of an object with a 4-/6-neighbour of another nonzero id, by looping over axes."""
    contact = np.zeros(labels.shape, bool)
    for axis in range(labels.ndim):
        for step in (1, -1):
            neighbour = np.roll(labels, step, axis=axis)
            edge = [slice(None)] * labels.ndim
            edge[axis] = 0 if step == 1 else -1
            neighbour[tuple(edge)] = labels[tuple(edge)]  # no wrap-around
            contact |= (labels > 0) & (neighbour > 0) & (neighbour != labels)
    return contact


@pytest.mark.parametrize("shape", [(40, 50), (12, 20, 24)])
def test_separate_touching_equals_brute_force(shape, rng):
    # Voronoi-like instances that touch, with some background
    seeds = np.zeros(shape, np.int32)
    points = tuple(rng.integers(0, s, 15) for s in shape)
    seeds[points] = np.arange(1, 16)
    _, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    labels = seeds[tuple(nearest)]
    labels[rng.random(shape) < 0.1] = 0
    separated = separate_touching(labels)
    contact = _brute_force_contacts(labels)
    assert contact.any()
    np.testing.assert_array_equal(separated, np.where(contact, 0, labels))
    # no two objects touch any more, and the weight map puts its border term on the new border
    assert not _brute_force_contacts(separated).any()
    np.testing.assert_array_equal(separate_touching(separated), separated)


def test_separate_touching_keeps_gapped_instances_and_outer_edges():
    labels = np.zeros((10, 14), np.int32)
    labels[2:8, 1:6], labels[2:8, 6:11], labels[2:8, 12:14] = 1, 2, 3  # 1 and 2 touch; 3 has a gap
    separated = separate_touching(labels)
    assert (separated[2:8, 5] == 0).all() and (separated[2:8, 6] == 0).all()
    assert (separated[2:8, 1:5] == 1).all() and (separated[2:8, 12:14] == 3).all()
    weights = weight_map(separated, w0=10, sigma=5)
    assert weights[4, 5] > 5 * weights[4, 2]
