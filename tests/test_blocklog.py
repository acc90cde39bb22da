"""Finished-block logs: the union over tasks, crash-cut lines, repeated task attempts."""

import threading

import numpy as np
import pytest

from unet_core.blocklog import TaskLog, finished_blocks, ranges


def test_finished_blocks_is_the_union_of_all_task_logs(tmp_path):
    with TaskLog(tmp_path, "run-0") as first, TaskLog(tmp_path, "run-1") as second:
        for block in (5, 1, 3):
            first.add(block)
        for block in (2, 3):
            second.add(block)
    np.testing.assert_array_equal(finished_blocks(tmp_path), [1, 2, 3, 5])
    assert finished_blocks(tmp_path / "missing").size == 0


def test_a_line_cut_short_by_a_crash_is_not_a_finished_block(tmp_path):
    (tmp_path / "run-0.log").write_bytes(b"7\n8\n12")  # the writer died inside "123\n"
    np.testing.assert_array_equal(finished_blocks(tmp_path), [7, 8])


def test_garbage_in_a_log_names_the_file(tmp_path):
    (tmp_path / "run-0.log").write_bytes(b"7\nseven\n")
    with pytest.raises(ValueError, match="run-0.log"):
        finished_blocks(tmp_path)


def test_a_repeated_attempt_sees_what_the_first_one_recorded(tmp_path):
    with TaskLog(tmp_path, "run-4") as first:
        assert not first.rerun and first.previous == set()
        first.add(40)
        first.add(41)
    with TaskLog(tmp_path, "run-4") as again:
        assert again.rerun and again.previous == {40, 41}
        again.add(42)
    np.testing.assert_array_equal(finished_blocks(tmp_path), [40, 41, 42])


def test_concurrent_adds_keep_every_line_whole(tmp_path):
    with TaskLog(tmp_path, "run-0") as log:
        threads = [threading.Thread(target=lambda k=k: [log.add(k * 10_000 + i) for i in range(2000)])
                   for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    ids = finished_blocks(tmp_path)
    assert len(ids) == 8000 and set(ids.tolist()) == {k * 10_000 + i for k in range(4) for i in range(2000)}


def test_ranges_compacts_ids_for_the_log():
    assert ranges([9, 3, 4, 5, 11, 12]) == "3-5, 9, 11-12"
    assert ranges([]) == ""
