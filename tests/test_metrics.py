import numpy as np
import pytest

from unet_core.metrics import foreground_scores, object_sizes, probability_qc


def test_foreground_scores_hand_computed():
    truth = np.array([[1, 1, 0, 0]])
    pred = np.array([[0, 2, 2, 0]])
    scores = foreground_scores(truth, pred)
    assert scores["iou"] == pytest.approx(1 / 3)
    assert scores["dice"] == pytest.approx(2 * 1 / 4)
    assert foreground_scores(truth, truth)["iou"] == 1.0
    assert foreground_scores(np.zeros((2, 2)), np.zeros((2, 2)))["dice"] == 1.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        foreground_scores(np.zeros((2, 2)), np.zeros((2, 3)))


def test_object_sizes_and_probability_qc():
    np.testing.assert_array_equal(object_sizes(np.array([[0, 1, 1], [3, 3, 3]])), [2, 3])
    qc = probability_qc(np.array([0.0, 0.5, 0.5, 1.0]))
    assert qc["uncertain_fraction"] == 0.5
    assert sum(qc["histogram"]) == 4
