#!/usr/bin/env bash
# Download (here, where pip reaches PyPI) the wheels that the GPU device machine lacks for
# unet_core's prediction and training and for bench/gpu.py, bench/train.py and
# bench/device_check.sh. That machine has no network and Python 3.12 with torch, numpy, scipy,
# scikit-image, tifffile, tqdm, pyyaml, jinja2, cloudpickle, toolz, fsspec, packaging and
# typing-extensions, but no zarr, numcodecs or dask.
#
# The set is what `import unet_core.predict, unet_core.train, unet_core.plan` and a predict_image
# + train run import: zarr (-> donfig, numcodecs, google-crc32c), dask (-> click, partd ->
# locket). Nothing of snakemake, bioimageio, imagecodecs, jsonschema, ome-zarr: unet_core
# imports them only in code paths the device check does not take (export, samples, cluster).
# Versions are pinned to those in .venv (pip freeze); binary wheels are the cp312 manylinux
# ones of the device.
#
#   bash scripts/device_wheels.sh                      # -> .device/wheels (8 wheels, about 11 MiB)
#   WITH_DISTRIBUTED=1 bash scripts/device_wheels.sh   # + distributed, tblib, zict, tornado:
#       lets tests/test_predict_zarr.py (imports distributed) run there too
#
# Then carry it to the device: run(carry=[".device/wheels"], command="bash bench/device_check.sh").
set -euo pipefail
cd "$(dirname "$0")/.."

PIP=${PIP:-.venv/bin/pip}
DEST=${DEST:-.device/wheels}
PY_VERSION=${PY_VERSION:-3.12}
CORE=(zarr donfig numcodecs google-crc32c dask click partd locket)
DISTRIBUTED=(distributed tblib zict tornado)   # msgpack, psutil, sortedcontainers, jinja2: on the device
packages=("${CORE[@]}")
if [[ ${WITH_DISTRIBUTED:-0} == 1 ]]; then packages+=("${DISTRIBUTED[@]}"); fi

# name==version from .venv, names compared normalised (PEP 503: lower case, runs of -_. as -)
freeze=$("$PIP" freeze --all 2>/dev/null | grep -E '^[A-Za-z0-9._-]+==' || true)
norm() { tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/-/g'; }
pins=()
for package in "${packages[@]}"; do
    line=$(awk -F'==' -v want="$(norm <<<"$package")" \
        '{ name = tolower($1); gsub(/[-_.]+/, "-", name); if (name == want) print }' <<<"$freeze")
    if [[ -z $line ]]; then echo "device_wheels: $package is not installed in the venv of $PIP" >&2; exit 1; fi
    pins+=("$line")
done

rm -rf "$DEST"
mkdir -p "$DEST"
echo "device_wheels: ${pins[*]}"
"$PIP" download --quiet --dest "$DEST" --no-deps --only-binary=:all: --implementation cp \
    --python-version "$PY_VERSION" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 "${pins[@]}"

count=$(find "$DEST" -name '*.whl' | wc -l)
if (( count != ${#pins[@]} )); then
    echo "device_wheels: expected ${#pins[@]} wheels, got $count" >&2
    exit 1
fi
ls -l "$DEST"
echo "device_wheels: $count wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
