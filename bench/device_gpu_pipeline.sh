#!/usr/bin/env bash
# The one command for a lent GPU machine: brings Ray onto the device image (which has torch and
# transformers but no Ray, redis-py or PyAV) and runs bench.gpu_pipeline within one device call,
# everything it writes under $OUT (gpu_pipeline.json, .png, .log, nvidia-smi.csv, ray_logs.tgz).
#
# Once, here, from the repository root (/.whl/ is in .gitignore):
#   bash ../shared/tools/device-ray-wheels.sh        # slim Ray 2.60 + jsonschema & co. (~42 MB)
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl redis # pure Python (~0.7 MB); cache_store imports it
# Then one device call (the tracked tree is ~18 MB: with .whl ~60 MB, under the 64 MiB that travels):
#   run(command="bash bench/device_gpu_pipeline.sh", carry=[".whl"], timeout_s=480)
# Extra arguments go to the benchmark (BUDGET_S sets --budget-s, default 420: the command's limit
# is 480 s, and the wheels install in ~10 s).
set -uo pipefail
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
ls .whl/ray-*.whl .whl/redis-*.whl >/dev/null || { echo "no wheels in .whl/: build them here first (see above)"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
# PyAV is not on the image and too big to carry beside Ray: the coordinator imports pipeline.decode
# (for decoder actors, which this benchmark does not start; av is used only when decoding), so an
# empty module stands in for it here
if ! python3 -c "import av" 2>/dev/null; then
  mkdir -p /tmp/stub/av && echo '"""Stand-in: no video is decoded on this machine."""' >/tmp/stub/av/__init__.py
fi
export PYTHONPATH=/tmp/site:/tmp/stub:$PWD PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/nvidia-smi.csv" 2>&1
python3 -c "import torch, transformers, ray; print('torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__)"
python3 -m bench.gpu_pipeline --out "$OUT" --budget-s "${BUDGET_S:-420}" "$@" 2>&1 | tee "$OUT/gpu_pipeline.log"
status=${PIPESTATUS[0]}
# Ray's own logs, for a post-mortem (skipped when large: files come back up to 16 MB each)
tar czf /tmp/ray_logs.tgz -C /tmp/ray session_latest/logs 2>/dev/null \
  && [ "$(stat -c %s /tmp/ray_logs.tgz)" -lt 15000000 ] && cp /tmp/ray_logs.tgz "$OUT/"
exit "$status"
