"""Settings of the slurm scheduler's worker jobs: what the config may hold."""

import pytest

from unet_core.cluster import SlurmSettings


def test_defaults_and_overrides():
    settings = SlurmSettings.from_config({"maximum_workers": 8, "job_directives": ["--constraint=a100"]})
    assert settings.maximum_workers == 8 and settings.minimum_workers == 1
    assert settings.job_directives == ("--constraint=a100",) and settings.gpus == 1
    assert SlurmSettings.from_config(None) == SlurmSettings()


@pytest.mark.parametrize("section, message", [
    ({"workers": 3}, "unknown setting"),
    ({"minimum_workers": 5, "maximum_workers": 2}, "minimum_workers <= maximum_workers"),
    ({"cores": 0}, "cores must be >= 1"),
    ({"partition": "gpu\nrm -rf /"}, "line break"),
    ({"job_directives": ["--qos=high", "--x\n#SBATCH --uid=0"]}, "line break"),
    ({"job_name": "a b"}, "job_name"),
])
def test_bad_settings_are_refused_with_the_key(section, message):
    with pytest.raises(ValueError, match=message):
        SlurmSettings.from_config(section)
