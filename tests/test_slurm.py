"""The demo workflow through a real one-node SLURM cluster with profiles/slurm.

scripts/local_slurm.sh installs Debian's slurm and munge when missing (root, apt-get) and starts
munged, slurmctld and slurmd on this machine; a cluster that cannot be started fails the test, it
never skips. The run adds one corrupt raw stack: every other stack must finish (`keep-going`),
the corrupt one's job must be reported with its logs, and the SLURM jobs must be in `squeue`'s
history. The local cluster has no accounting database, so job status comes from `squeue`.
Deselect with ``pytest -m "not slurm"``; docs/slurm.md has the details.
"""

import csv
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import SNAKEMAKE, copy_workflow, slurm

BROKEN = "broken_stack"
TRAIN_STEPS = 40
DEMO_RULES = {"demo_data", "ingest", "weight_map", "train", "predict", "segment", "evaluate"}


def _sample_rows(path):
    """Rows of a sample sheet as dicts (comment lines skipped, as common.smk does)."""
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return list(csv.DictReader(lines, delimiter="\t"))


def _fit_to_node(profile, cpus, mem_mb):
    """Command-line resources of `profile` with threads and memory capped to the local node.

    A command-line `--set-resources` replaces the profile's whole entry, so everything else
    (partitions, GPUs, runtimes) is passed on unchanged. Memory is capped at one CPU's share.
    """
    mem_cap = mem_mb // cpus

    def item(key, value):
        value = min(value, mem_cap) if key == "mem_mb" else value
        return f"{key}={value!r}"

    args = ["--default-resources", *(item(k, v) for k, v in profile["default-resources"].items())]
    args += ["--set-resources", *(f"{rule}:{item(k, v)}"
                                  for rule, resources in profile["set-resources"].items()
                                  for k, v in resources.items())]
    args += ["--set-threads", *(f"{rule}={min(n, cpus)}" for rule, n in profile["set-threads"].items())]
    return args


@pytest.fixture(scope="module")
def slurm_run(slurm_env, repo, tmp_path_factory):
    """The demo plus one corrupt stack, run with profiles/slurm: (workdir, result, run id)."""
    work = copy_workflow(tmp_path_factory.mktemp("slurm_workflow"))
    broken = work / "resources" / "incoming" / f"{BROKEN}.tif"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"this is not a TIFF file\x00\xff" * 64)
    samples = work / "config" / "samples.tsv"
    header = _sample_rows(samples)[0].keys()
    row = {"stack": BROKEN, "path": str(broken.relative_to(work)), "role": "predict"}
    samples.write_text(samples.read_text().rstrip("\n") + "\n"
                       + "\t".join(row.get(column, "") for column in header) + "\n")

    # A short training: this test is about SLURM, test_workflow.py about accuracy.
    config = work / "config" / "config.yaml"
    config.write_text(config.read_text().replace("  steps: 300\n", f"  steps: {TRAIN_STEPS}\n", 1))
    assert f"steps: {TRAIN_STEPS}" in config.read_text()

    profile = yaml.safe_load((work / "profiles" / "slurm" / "config.yaml").read_text())
    cpus, mem_mb = map(int, slurm(slurm_env, "sinfo", "-h", "-N", "-o", "%c %m").split()[:2])
    command = [SNAKEMAKE, "--profile", "profiles/slurm",
               *_fit_to_node(profile, cpus, mem_mb),
               # No slurmdbd on the local cluster: status from squeue (MinJobAge is 1 h there).
               "--slurm-status-command", "squeue",
               # Poll sooner than a site would, and do not wait for a shared filesystem.
               "--slurm-init-seconds-before-status-checks", "5",
               "--seconds-between-status-checks", "2",
               "--latency-wait", "5",
               # Keep every job's SLURM output in the temporary folder, for a failing test.
               "--slurm-keep-successful-logs"]
    result = subprocess.run(command, cwd=work, env=slurm_env, capture_output=True, text=True, timeout=1500)
    output = result.stdout + result.stderr
    run_id = re.search(r"SLURM run ID: (\S+)", output)
    assert run_id, output[-4000:]
    return work, result, run_id.group(1)


def _jobs(env, run_id):
    """This run's jobs in squeue's history, each {id, state, partition, tres, comment}.

    The plugin names every job after the run and comments it with its rule and wildcards.
    """
    fields = ("id", "state", "partition", "tres", "comment")
    out = slurm(env, "squeue", "--states=all", "--noheader", "--name", run_id,
                 "--Format=JobID:|,State:|,Partition:|,tres-per-job:|,Comment:")
    return [dict(zip(fields, line.split("|", 4))) for line in out.splitlines() if line.strip()]


def _rule(job):
    return re.match(r"rule_([a-z_]+?)(_wildcards_.*)?$", job["comment"]).group(1)


@pytest.mark.slurm
def test_other_stacks_finish(slurm_run):
    work, result, _ = slurm_run
    assert result.returncode != 0, "a run with a corrupt stack must fail"
    roles = {row["stack"]: row["role"] for row in _sample_rows(work / "config" / "samples.tsv")}
    expected = ["results/models/demo/model.pt"]
    for stack, role in roles.items():
        if stack == BROKEN:
            continue
        expected.append(f"results/zarr/{stack}.ome.zarr")
        if role in ("train", "val"):
            expected.append(f"results/weights/{stack}.zarr")
        if role in ("val", "predict"):
            expected += [f"results/predictions/{stack}.ome.zarr",
                         f"results/segmentation/{stack}.ome.zarr", f"results/metrics/{stack}.json"]
    missing = [path for path in expected if not (work / path).exists()]
    assert not missing, f"missing outputs {missing}\n{result.stderr[-4000:]}"
    assert not (work / "results" / "zarr" / f"{BROKEN}.ome.zarr").exists()


@pytest.mark.slurm
def test_failed_job_is_reported_with_its_logs(slurm_run, slurm_env):
    work, result, run_id = slurm_run
    output = result.stdout + result.stderr
    errors = re.findall(r"Error in rule ingest:\n(?:    .*\n)+", output)
    # retries: 1 in the profile, so the corrupt stack's ingest ran, and failed, twice.
    assert len(errors) == 2, output[-4000:]
    reported = []
    for error in errors:
        assert f"output: results/zarr/{BROKEN}.ome.zarr\n" in error, error
        jobid = re.search(r"SLURM-job '(\d+)' failed, SLURM status is: 'FAILED'", error)
        logs = re.search(r"^    log: (.*) \(check log file\(s\) for error details\)$", error, re.M)
        assert jobid and logs, error
        rule_log, slurm_log = (Path(path) for path in logs.group(1).split(", "))
        assert rule_log == Path("logs") / "ingest" / f"{BROKEN}.log"
        assert slurm_log == work / ".snakemake" / "slurm_logs" / "rule_ingest" / BROKEN / f"{jobid.group(1)}.log"
        assert f"{BROKEN}.tif: not a readable TIFF file" in slurm_log.read_text()
        reported.append(jobid.group(1))
    assert f"{BROKEN}.tif: not a readable TIFF file" in (work / rule_log).read_text()
    failed = [job for job in _jobs(slurm_env, run_id) if job["state"] == "FAILED"]
    assert sorted(job["id"] for job in failed) == sorted(reported), failed
    assert {job["comment"] for job in failed} == {f"rule_ingest_wildcards_{BROKEN}"}, failed


@pytest.mark.slurm
def test_jobs_are_in_squeue_history(slurm_run, slurm_env):
    _, result, run_id = slurm_run
    jobs = _jobs(slurm_env, run_id)
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", result.stdout + result.stderr)
    assert sorted(submitted) == sorted(job["id"] for job in jobs)
    completed = {_rule(job) for job in jobs if job["state"] == "COMPLETED"}
    # Everything but the report, which needs the corrupt stack's metrics.
    assert DEMO_RULES <= completed <= DEMO_RULES | {"report"}, jobs
    for job in jobs:
        if _rule(job) in ("train", "predict"):
            assert (job["partition"], job["tres"]) == ("gpu", "gres:gpu:1"), job
        else:
            assert (job["partition"], job["tres"]) == ("cpu", "N/A"), job


@pytest.mark.slurm
def test_no_job_left_running(slurm_run, slurm_env):
    _, _, run_id = slurm_run
    active = slurm(slurm_env, "squeue", "--noheader", "--name", run_id,
                    "--states=PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED", "--format=%i %T %k")
    assert active == "", active
