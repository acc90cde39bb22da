"""unet_core.qc: the QC that evaluate records per stack and the report's batch outlier flags."""

import numpy as np
import pytest

from unet_core.qc import StackQC, flag_outlier_stacks, object_sizes, probability_qc, relative_drift


def test_object_sizes_and_probability_qc():
    np.testing.assert_array_equal(object_sizes(np.array([[0, 1, 1], [3, 3, 3]])), [2, 3])
    qc = probability_qc(np.array([0.0, 0.5, 0.5, 1.0]))
    assert qc["uncertain_fraction"] == 0.5 and qc["mean_probability"] == 0.5
    assert sum(qc["histogram"]) == 4 and qc["histogram"][0] == 1 and qc["histogram"][-1] == 1


def test_relative_drift_hand_computed():
    assert relative_drift([10.0, 12.0, 14.0, 16.0]) == pytest.approx(2.0 * 3 / 13)  # slope 2, 3 steps, mean 13
    assert relative_drift([16.0, 14.0, 12.0, 10.0]) == pytest.approx(-2.0 * 3 / 13)
    assert relative_drift([5.0]) == 0.0 and relative_drift([]) == 0.0 and relative_drift([0.0, 0.0]) == 0.0


def test_stack_qc_plane_by_plane():
    """Two planes of a stack: counts, sizes, uncertainty and drift by hand."""
    labels = [np.zeros((4, 6), np.int32), np.zeros((4, 6), np.int32)]
    labels[0][:2, :2], labels[0][2:, 3:] = 1, 2  # sizes 4 and 6
    labels[1][:2, :2] = 1  # size 4
    foreground = [np.full((4, 6), 0.5, np.float32), np.zeros((4, 6), np.float32)]
    raw = [np.full((4, 6), 100.0), np.full((4, 6), 110.0)]
    qc = StackQC()
    for plane in zip(labels, foreground, raw):
        qc.add(*plane)
    result = qc.result()
    assert result["objects_per_plane"] == [2, 1] and result["mean_objects_per_plane"] == 1.5
    assert result["object_sizes"] == [4, 6, 4] and result["object_size_median"] == 4.0
    assert result["uncertain_fraction"] == 0.5  # all of plane 0, none of plane 1
    assert sum(result["probability_histogram"]) == 48 and result["probability_histogram"][0] == 24
    assert result["mean_intensity_per_plane"] == [100.0, 110.0]
    assert result["relative_intensity_drift"] == pytest.approx(10.0 / 105.0)
    empty = StackQC().result()
    assert empty["mean_objects_per_plane"] == 0.0 and empty["relative_intensity_drift"] == 0.0


def test_outlier_flags():
    rng = np.random.default_rng(6)
    summaries = {}
    for k, mean in enumerate([100, 101, 99, 100.5, 160]):
        qc = StackQC()
        for _ in range(3):
            probabilities = rng.random((16, 16)).astype(np.float32)
            qc.add((probabilities > 0.5).astype(np.int32), probabilities, rng.normal(mean, 1.0, (16, 16)))
        result = qc.result()
        summaries[f"stack{k}"] = {"mean_intensity": float(np.mean(result["mean_intensity_per_plane"])),
                                  "uncertain_fraction": result["uncertain_fraction"]}
    flags = flag_outlier_stacks(summaries)
    assert flags["stack4"]["outlier"] and flags["stack4"]["reasons"] == ["mean_intensity"]
    assert not any(flags[f"stack{k}"]["outlier"] for k in range(4))
    # hand-computed modified z: values 10, 11, 10.5, 9.8, 30 -> median 10.5, MAD 0.5
    flags = flag_outlier_stacks({name: {"x": v} for name, v in zip("abcde", [10, 11, 10.5, 9.8, 30])})
    assert flags["e"]["z_scores"]["x"] == pytest.approx(0.6745 * 19.5 / 0.5)
    assert flags["d"]["z_scores"]["x"] == pytest.approx(0.6745 * -0.7 / 0.5) and not flags["d"]["outlier"]
    small = flag_outlier_stacks({"a": {"x": 1.0}, "b": {"x": 100.0}})
    assert not small["a"]["outlier"] and not small["b"]["outlier"]  # too few stacks to judge


@pytest.mark.parametrize("call, message", [
    (lambda: flag_outlier_stacks({}, threshold=0), "threshold"),
    (lambda: flag_outlier_stacks({"a": {"x": "high"}}), "must be a number"),
])
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()
