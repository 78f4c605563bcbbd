#!/usr/bin/env bash
# Download the Python 3.12 manylinux wheels a GPU machine without network needs for the data
# pipeline (grain, tensorflow-datasets and their dependencies) into ./wheels (git-ignored);
# benchmarks/run_device.sh installs them from there when the folder is present.
#
#   bash benchmarks/fetch_wheels.sh            # ~12-27 MB
set -euo pipefail
cd "$(dirname "$0")/.."
P="--python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64"
mkdir -p wheels
python3 -m pip download -q $P -d wheels grain importlib_resources simple_parsing tensorflow-metadata \
  dm-tree array_record immutabledict termcolor toml
python3 -m pip download -q $P --no-deps -d wheels tensorflow-datasets
python3 -m pip download -q --no-deps --no-binary=:all: -d wheels promise
rm -f wheels/numpy-*          # the machine's own numpy must stay
ls wheels | wc -l
