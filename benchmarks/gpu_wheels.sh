#!/usr/bin/env bash
# Download, into .whl/, the wheels of this service's dependencies that a bare CUDA machine image
# with Python 3.12, torch, timm, httpx, pillow, numpy, uvloop, anyio, h11, pyyaml, tqdm,
# psutil, pytest and prometheus-client lacks, at the versions installed in this checkout's .venv,
# for CPython 3.12 on x86-64 Linux. benchmarks/gpu_check.sh installs them from there.
#
#   bash benchmarks/gpu_wheels.sh        # then carry .whl to the GPU machine with the checkout
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PACKAGES="fastapi starlette annotated-doc pydantic pydantic-core pydantic-settings python-dotenv
annotated-types typing-inspection typing-extensions opentelemetry-api uvicorn click httptools
python-multipart orjson isal"
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
for name in $PACKAGES; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$name==$version"
done
ls .whl
