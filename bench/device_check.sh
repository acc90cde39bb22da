#!/usr/bin/env bash
# The GPU checks of unet_core in one run on the lent device machine (one H100/H200, no network,
# Python 3.12 with a CUDA torch; no zarr, numcodecs, dask there). Made for the device `run` tool:
#
#   bash scripts/device_wheels.sh        # here, once: the missing wheels -> .device/wheels
#   run(command="bash bench/device_check.sh", carry=[".device/wheels"], timeout_s=400)
#   then, if time is left (15 device minutes a session, starts included), on the warm machine:
#   run(command="DEVICE_CHECK_STEPS='install train tests-gpu tests-cuda' bash bench/device_check.sh", ...)
#
# Steps, in this order, each under its own `timeout` and all inside one overall budget
# (DEVICE_CHECK_BUDGET, default 360 s, so that a second run fits the session's device time; a
# step gets what is left of it, a step with under 15 s left is skipped), so no hang can eat the
# session's device time. By default the first six (the figures of the issue); the others on a
# second run:
#   env        nvidia-smi, python/torch/CUDA/cuDNN versions, the GPU's bf16 support, CPU/RAM/disk
#   install    pip install --no-index --no-deps --target $SITE the carried wheels (unzipped
#              when that python has no pip) and check their requirements against what is there
#   imports    unet_core.predict/.train/.plan/.ingest/.prepare/.demo from $SITE and this tree
#   smoke      seconds: a tiny 2D and 3D predict_image on the default device (fp32 against the
#              CPU's result, auto precision recorded) and a 20-step train() with amp
#   tests-gpu  pytest -m gpu tests/test_memory.py (the tests marked gpu: skipped without CUDA)
#   bench-3d   python bench/gpu.py --only 3d (3D U-Net 32 features depth 4, 256x1024x1024)
#   bench-2d   python bench/gpu.py --only 2d (paper 2D U-Net, 16x2048x2048; fp32 and bf16)
#   train      training steps/s of the ISBI 2012 cpu and paper presets (config/isbi2012.yaml),
#              amp on (bf16) and off (fp32): train() end to end on the demo stacks, and the
#              model alone on in-memory batches -> $OUT/train_timing.json
#   tests-cuda tests whose path changes where CUDA exists (train() and predict_image default to
#              the GPU): tests/test_train.py tests/test_precision.py, and tests/test_predict_zarr.py
#              when distributed imports (WITH_DISTRIBUTED=1 bash scripts/device_wheels.sh)
# Everything goes to $OUT/device_check.log (pytest: $OUT/tests-*.xml too). Exits 0 whatever
# fails; the last lines name the steps that failed, timed out or were skipped.
#
# Knobs (environment):
#   PY=python3                 interpreter
#   DEVICE_CHECK_STEPS="..."   run only these steps (names above, space-separated), e.g. for a rerun
#   DEVICE_CHECK_BUDGET=360    seconds for all steps together
#   BENCH_2D / BENCH_3D="features,depth,z,y,x"   other bench/gpu.py sizes without editing it,
#                              e.g. BENCH_3D=32,4,128,1024,1024 halves the 3D volume
#   BENCH_ARGS="..."           more bench/gpu.py arguments (e.g. --precisions bf16, --compile)
#   DEVICE_CHECK_TESTS="..."   the test files/ids of tests-cuda
#   TRAIN_WORKERS=8            data-loader workers of the timed train() runs (the paper preset's 8)
#   DEVICE_CHECK_DRY=1         check this script on a CPU machine: tiny sizes, tests only collected
#                              (with PY= a Python whose wheels are in WHEELS=, e.g. a cp311 set)
#   WHEELS=.device/wheels SITE=/tmp/site OUT=(the run tool's $OUT; else .device/out)
set -u
cd "$(dirname "$0")/.." || exit 0

PY=${PY:-python3}
DRY=${DEVICE_CHECK_DRY:-0}
WHEELS=${WHEELS:-.device/wheels}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-.device/out}
BUDGET=${DEVICE_CHECK_BUDGET:-360}
STEPS=${DEVICE_CHECK_STEPS:-env install imports smoke bench-3d bench-2d}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/device_check.log
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 MPLBACKEND=Agg
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
if [[ $DRY == 1 ]]; then
    export BENCH_2D=${BENCH_2D:-8,2,1,128,128} BENCH_3D=${BENCH_3D:-4,2,24,64,64}
fi

START=$SECONDS
FAILED=()
PASSED=()
SKIPPED=()

# step NAME CAP COMMAND...: run COMMAND under timeout min(CAP, budget left), logged and timed.
step() {
    local name=$1 cap=$2 left limit began rc
    shift 2
    if [[ " $STEPS " != *" $name "* ]]; then return 0; fi
    left=$((BUDGET - (SECONDS - START)))
    limit=$((cap < left ? cap : left))
    if ((limit < 15)); then
        echo "=== [$name] skipped: ${left} s of the ${BUDGET} s budget left"
        SKIPPED+=("$name")
        return 0
    fi
    echo
    echo "=== [$name] $(date +%T), timeout ${limit} s: $*"
    began=$SECONDS
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@"  # a new process group: all of it is stopped
    rc=$?
    if ((rc == 124 || rc == 137)); then
        echo "=== [$name] TIMED OUT after $((SECONDS - began)) s (limit ${limit} s)"
        FAILED+=("$name(timeout)")
    elif ((rc != 0)); then
        echo "=== [$name] FAILED rc=$rc after $((SECONDS - began)) s"
        FAILED+=("$name(rc=$rc)")
    else
        echo "=== [$name] ok in $((SECONDS - began)) s"
        PASSED+=("$name")
    fi
    return 0
}

env_info() {
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "(no nvidia-smi)"; fi
    "$PY" - <<'EOF'
import importlib.metadata as md, os, platform, sys
import torch
print(f"python {platform.python_version()} at {sys.executable}; {os.cpu_count()} CPUs; torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, threads {torch.get_num_threads()}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
              f"native bf16 {torch.cuda.is_bf16_supported(including_emulation=False)}")
else:
    print("torch sees no CUDA GPU")
names = ["numpy", "scipy", "scikit-image", "tifffile", "tqdm", "PyYAML", "Jinja2", "matplotlib", "cloudpickle",
         "toolz", "fsspec", "packaging", "typing_extensions", "psutil", "msgpack", "sortedcontainers", "tornado",
         "pytest", "pip"]
found = []
for name in names:
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        found.append(f"{name} MISSING")
print("; ".join(found))
EOF
    free -g | head -2
    df -h /tmp | tail -1
}

install_wheels() {
    local wheels=()
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    if ((${#wheels[@]} == 0)); then
        echo "no wheels in $WHEELS: run bash scripts/device_wheels.sh here and carry .device/wheels"
        return 1
    fi
    rm -rf "$SITE" && mkdir -p "$SITE" || return 1
    if [[ ${FORCE_UNZIP:-0} != 1 ]] && "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install --quiet --no-index --no-deps --no-cache-dir --target "$SITE" "${wheels[@]}" || return 1
    else
        echo "no pip for $PY (or FORCE_UNZIP=1): unpacking the wheels into $SITE"
        "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
            "$SITE" "${wheels[@]}" || return 1
    fi
    ls "$SITE"
    # Every requirement of the installed wheels, met by them or by what the machine has?
    "$PY" - "$SITE" <<'EOF'
import importlib.metadata as md, sys
from packaging.requirements import Requirement
bad = 0
for dist in sorted(md.distributions(path=[sys.argv[1]]), key=lambda d: d.metadata["Name"].lower()):
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            print(f"MISSING {req.name} (required by {dist.metadata['Name']}: {text})")
            bad += 1
            continue
        if not req.specifier.contains(have, prereleases=True):
            print(f"CONFLICT {req.name} {have} (required by {dist.metadata['Name']}: {text})")
            bad += 1
print(f"installed {len(list(md.distributions(path=[sys.argv[1]])))} distributions; {bad} unmet requirements")
sys.exit(1 if bad else 0)
EOF
}

check_imports() {
    "$PY" - <<'EOF'
import time
began = time.perf_counter()
import dask, numcodecs, torch, zarr
import unet_core
import unet_core.demo, unet_core.ingest, unet_core.plan, unet_core.predict, unet_core.prepare, unet_core.train
print(f"imported in {time.perf_counter() - began:.1f} s: unet_core from {unet_core.__file__}")
for module in (zarr, numcodecs, dask):
    print(f"  {module.__name__} {module.__version__} from {module.__file__}")
try:
    import distributed
    print(f"  distributed {distributed.__version__} (tests/test_predict_zarr.py can run)")
except ImportError as error:
    print(f"  no distributed ({error}): tests/test_predict_zarr.py is left out")
EOF
}

smoke() {
    "$PY" - <<'EOF'
"""Seconds: tiny 2D/3D predict_image on the default device against the CPU, and a short train()."""
import json, tempfile, time
from pathlib import Path
import numpy as np, tifffile, torch
from unet_core import ingest, io
from unet_core.demo import synthetic_cells
from unet_core.model import UNet
from unet_core.predict import predict_image
from unet_core.train import TrainSettings, train

device = "cuda" if torch.cuda.is_available() else "cpu"
ok = True
with tempfile.TemporaryDirectory(prefix="device-smoke-") as tmp:
    tmp = Path(tmp)
    for ndim, shape, axes in ((2, (3, 96, 128), "TYX"), (3, (24, 64, 80), "ZYX")):
        torch.manual_seed(0)
        model = UNet(base_channels=4, depth=2, ndim=ndim, dropout=0.0)
        torch.save({"model": model.state_dict(), "architecture": model.config()}, tmp / f"m{ndim}.pt")
        data = np.random.default_rng(ndim).integers(0, 4000, shape).astype(np.uint16)
        tifffile.imwrite(tmp / f"in{ndim}.tif", data, metadata={"axes": axes}, photometric="minisblack")
        image = ingest.ingest(tmp / f"in{ndim}.tif", tmp / f"in{ndim}.ome.zarr", axes=axes.lower())
        results = {}
        for where, precision in (("cpu", "fp32"), (device, "fp32"), (None, "auto")):
            out = tmp / f"out{ndim}-{where}-{precision}.ome.zarr"
            began = time.perf_counter()
            predict_image(tmp / f"m{ndim}.pt", image, out, device=where, precision=precision, dtype="float32")
            opened = io.open_image(out)
            results[where, precision] = np.asarray(opened.array)
            record = opened.attrs["unet_core"]
            print(f"  {ndim}D device={where} precision={precision}: {time.perf_counter() - began:.2f} s, "
                  f"recorded precision {record['precision']}, tile {record.get('tile')}, output {opened.array.shape}")
        exact = np.abs(results[device, "fp32"] - results["cpu", "fp32"]).max()
        auto = np.abs(results[None, "auto"] - results["cpu", "fp32"]).max()
        print(f"  {ndim}D max |p({device} fp32) - p(cpu fp32)| = {exact:.3g}, "
              f"max |p(auto) - p(cpu fp32)| = {auto:.3g}")
        ok &= bool(exact <= 1e-4 and auto <= 0.1)
    image, labels = synthetic_cells((3, 96, 96), seed=0)
    tifffile.imwrite(tmp / "cells.tif", image, metadata={"axes": "TYX"}, photometric="minisblack")
    tifffile.imwrite(tmp / "cells_labels.tif", labels.astype(np.uint16), metadata={"axes": "TYX"},
                     photometric="minisblack")
    stack = ingest.ingest(tmp / "cells.tif", tmp / "cells.ome.zarr", labels_path=tmp / "cells_labels.tif", axes="tyx")
    settings = TrainSettings(base_channels=4, depth=2, tile=36, batch_size=2, steps=20, log_every=5,
                             validate_every=10, checkpoint_every=10, amp=True)
    began = time.perf_counter()
    train(train_images=[str(stack)], val_images=[str(stack)], out_dir=tmp / "train", settings=settings)
    card = json.loads((tmp / "train" / "model_card.json").read_text())
    print(f"  train 20 steps: {time.perf_counter() - began:.1f} s on {card['device']}, precision {card['precision']}, "
          f"final {card['final_metrics']}, torchscript {card['exported']}")
print("smoke ok" if ok else "smoke: predictions differ more than expected")
raise SystemExit(0 if ok else 1)
EOF
}

pytest_run() {  # pytest_run NAME ARGS...
    local name=$1
    shift
    local collect=()
    [[ $DRY == 1 ]] && collect=(--collect-only)
    "$PY" -m pytest -q -rA -p no:cacheprovider --durations=10 --junitxml="$OUT/$name.xml" "${collect[@]}" "$@"
}

cuda_tests() {
    local tests
    if [[ -n ${DEVICE_CHECK_TESTS:-} ]]; then
        read -r -a tests <<<"$DEVICE_CHECK_TESTS"
    else
        tests=(tests/test_train.py tests/test_precision.py)
        if "$PY" -c "import distributed" 2>/dev/null; then tests+=(tests/test_predict_zarr.py); fi
    fi
    pytest_run tests-cuda "${tests[@]}"
}

gpu_bench() {  # gpu_bench 2d|3d: bench/gpu.py, its SIZES replaced from BENCH_2D / BENCH_3D when set
    "$PY" - --only "$1" ${BENCH_ARGS:-} <<'EOF'
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("bench_gpu", "bench/gpu.py")
gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu)
for name in ("2d", "3d"):
    value = os.environ.get(f"BENCH_{name.upper()}")
    if value:
        features, depth, *shape = (int(v) for v in value.split(","))
        for sizes in gpu.SIZES.values():
            sizes[name] = (features, depth, tuple(shape))
        print(f"bench sizes of {name} set from BENCH_{name.upper()}: {features} features, depth {depth}, {tuple(shape)}")
sys.argv = ["bench/gpu.py", *sys.argv[1:]]
gpu.main()
EOF
}

train_timing() {
    "$PY" - "$OUT/train_timing.json" <<'EOF'
"""Training steps/s of the ISBI 2012 presets, amp on and off: train() end to end (augmenting
data loader, log, checkpoint) and the model alone on in-memory batches already on the device."""
import json, os, sys, tempfile, time
from pathlib import Path
import numpy as np, torch, yaml
from unet_core import ingest, weighted_cross_entropy
from unet_core.demo import write_demo_data
from unet_core.model import UNet
from unet_core.overlap_tile import memory_format as layout_of
from unet_core.precision import autocast, needs_loss_scaling, training_precision
from unet_core.prepare import prepare_targets
from unet_core.train import TileDataset, TrainSettings, load_training_stack, train

dry = os.environ.get("DEVICE_CHECK_DRY") == "1"
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
config = yaml.safe_load(Path("config/isbi2012.yaml").read_text())
presets = {name: {**config["presets"][name]["model"], **config["presets"][name]["train"]} for name in ("cpu", "paper")}
steps = {"cpu": 200, "paper": 150}
log_every, timed_steps = 25, 30
if dry:  # the code path only, at toy sizes
    presets = {name: {**p, "base_channels": 4, "depth": 2, "tile": 36, "batch_size": 2} for name, p in presets.items()}
    steps, log_every, timed_steps = {"cpu": 6, "paper": 6}, 2, 3
workers = int(os.environ.get("TRAIN_WORKERS", "2" if dry else "8"))


def model_only(settings, stacks, precision):
    """Steps/s of forward, weighted loss, backward and optimiser step on 4 batches held on the device."""
    torch.manual_seed(0)
    memory_format = layout_of(settings.ndim)
    model = UNet(in_channels=1, n_classes=settings.n_classes, base_channels=settings.base_channels,
                 depth=settings.depth, dropout=settings.dropout).to(device, memory_format=memory_format).train()
    if settings.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate, momentum=settings.momentum)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_loss_scaling(precision))
    dataset = TileDataset(stacks, model, settings)
    held = [tuple(t.to(device) for t in dataset[i]) for i in range(4)]

    def one(i):
        image, target, weight = held[i % len(held)]
        with autocast(precision, device):
            logits = model(image.contiguous(memory_format=memory_format))
        loss = weighted_cross_entropy(logits, target, weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for i in range(3):
        one(i)
    sync()
    began = time.perf_counter()
    for i in range(timed_steps):
        one(i)
    sync()
    return timed_steps / (time.perf_counter() - began)


results = []
with tempfile.TemporaryDirectory(prefix="device-train-") as tmp:
    tmp = Path(tmp)
    began = time.perf_counter()
    write_demo_data(tmp / "demo")
    images, weights = [], []
    for name in ("timelapse_a", "timelapse_b", "timelapse_d"):
        images.append(str(ingest.ingest(tmp / "demo" / f"{name}.tif", tmp / f"{name}.ome.zarr",
                                        labels_path=tmp / "demo" / f"{name}_labels.tif")))
        weights.append(str(prepare_targets(images[-1], tmp / f"{name}.weights.zarr")))
    stacks = [load_training_stack(i, w, 2) for i, w in zip(images, weights)]
    print(f"demo stacks ready in {time.perf_counter() - began:.1f} s; device {device}, data-loader workers {workers}")
    for name, preset in presets.items():
        for amp in (True, False):
            settings = TrainSettings(**{**preset, "steps": steps[name], "log_every": log_every,
                                        "validate_every": 10**9, "checkpoint_every": steps[name],
                                        "num_workers": workers, "amp": amp})
            precision = training_precision(amp, device)
            began = time.perf_counter()
            out = train(train_images=images, train_weights=weights, out_dir=tmp / f"{name}-{amp}", settings=settings)
            wall = time.perf_counter() - began
            rows = (out / "training_log.tsv").read_text().splitlines()
            header, first, last = rows[0].split("\t"), rows[1].split("\t"), rows[-1].split("\t")
            step_at, seconds_at = header.index("step"), header.index("seconds")
            rate = (int(last[step_at]) - int(first[step_at])) / (float(last[seconds_at]) - float(first[seconds_at]))
            card = json.loads((out / "model_card.json").read_text())
            alone = model_only(settings, stacks, precision)
            row = {"preset": name, "base_channels": settings.base_channels, "depth": settings.depth,
                   "tile": settings.tile, "batch_size": settings.batch_size, "optimizer": settings.optimizer,
                   "amp": amp, "precision": card["precision"], "device": card["device"], "workers": workers,
                   "steps": settings.steps, "train_steps_per_s": round(rate, 2),
                   "train_wall_s": round(wall, 1), "model_only_steps_per_s": round(alone, 2),
                   "final_loss": card["final_metrics"].get("loss")}
            results.append(row)
            print(f"{name:5s} preset ({settings.base_channels} ch, depth {settings.depth}, tile {settings.tile}, "
                  f"batch {settings.batch_size}) amp={amp!s:5s} {card['precision']}: train() {rate:7.2f} steps/s "
                  f"(steps {first[step_at]}-{last[step_at]}; {settings.steps} steps {wall:.1f} s with setup and "
                  f"export), model alone {alone:7.2f} steps/s", flush=True)
Path(sys.argv[1]).write_text(json.dumps({"device": str(device), "gpu": torch.cuda.get_device_name() if
                                         device.type == "cuda" else None, "torch": torch.__version__,
                                         "results": results}, indent=2))
EOF
}

main() {
    echo "device_check $(date -Is) in $PWD; PY=$PY DRY=$DRY WHEELS=$WHEELS SITE=$SITE OUT=$OUT budget ${BUDGET} s"
    echo "steps: $STEPS"
    step env 30 env_info
    step install 90 install_wheels
    step imports 60 check_imports
    step smoke 90 smoke
    step bench-3d 200 gpu_bench 3d
    step bench-2d 150 gpu_bench 2d
    step train 150 train_timing
    step tests-gpu 90 pytest_run tests-gpu -m gpu tests/test_memory.py
    step tests-cuda 180 cuda_tests
    echo
    echo "=== device_check done in $((SECONDS - START)) s of the ${BUDGET} s budget"
    echo "passed: ${PASSED[*]:-none}"
    echo "failed: ${FAILED[*]:-none}"
    echo "skipped: ${SKIPPED[*]:-none}"
}

# Functions run under `timeout` need bash: export them and call them through `bash -c`.
export -f env_info install_wheels check_imports smoke pytest_run cuda_tests gpu_bench train_timing
export PY DRY WHEELS SITE OUT DEVICE_CHECK_DRY=$DRY
main 2>&1 | tee "$LOG"
exit 0
