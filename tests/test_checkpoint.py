"""Checkpoint files are untrusted: read with weights_only=True, errors name the file."""

import os
import pickle

import pytest
import torch

from unet_core.checkpoint import CheckpointError, read_checkpoint
from unet_core.predict import load_model


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


class _Plain:
    """A harmless class that torch does not block outright: it advises allowlisting it instead."""


def test_reads_a_plain_checkpoint(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"step": 3, "model": {"w": torch.ones(2)}}, path)
    contents = read_checkpoint(path)
    assert contents["step"] == 3 and torch.equal(contents["model"]["w"], torch.ones(2))


@pytest.mark.parametrize("save, payload", [
    (torch.save, _RunsCode), (lambda obj, path: path.write_bytes(pickle.dumps(obj)), _RunsCode), (torch.save, _Plain),
], ids=["os.system torch.save", "os.system plain pickle", "unknown class"])
def test_pickled_code_is_refused_without_torchs_advice(tmp_path, save, payload):
    path = tmp_path / "evil.pt"
    save({"model": payload()}, path)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "refused and never run" in message
    # torch's own message advises weights_only=False, which would run the file's code
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    assert "safe_globals" not in message and "Please" not in message  # allowlisting is as unsafe
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path)


def test_truncated_and_foreign_files_name_the_file(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"{truncated}: cannot be read: truncated or not a torch checkpoint"):
        read_checkpoint(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=str(text)):
        read_checkpoint(text)
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    with pytest.raises(CheckpointError, match="expected a mapping"):
        read_checkpoint(listed)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_checkpoint(tmp_path / "missing.pt")
