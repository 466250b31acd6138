#!/usr/bin/env bash
# Install the project and pass its tests: notebook cleanliness, library sync, every notebook, and pytest.
# Run from the repository root, inside a virtual environment: python3 -m venv .venv && . .venv/bin/activate
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
# CPU torch first, so that the project's `torch` requirement does not pull a multi-GB CUDA build.
# Elsewhere, set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu to get the CPU wheel from PyTorch.
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# Debian's chromium for the browser test of the Gradio app (Playwright cannot download browsers here).
if ! [ -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "could not install chromium: the browser test will fail" >&2
  else echo "install Debian's chromium (sudo apt-get install chromium) for the browser test" >&2; fi
fi
echo "install took $(( $(date +%s) - t0 )) s"

# 1. The notebooks are clean and the library is what they export.
nbdev_clean
nbdev_export
if ! git diff --quiet -- nbs vlmcourse || [ -n "$(git status --porcelain -- nbs vlmcourse)" ]; then
  echo "nbdev_clean or nbdev_export changed files: run both and commit the result" >&2
  git status --porcelain -- nbs vlmcourse >&2; git --no-pager diff --stat -- nbs vlmcourse >&2
  exit 1
fi

# 2. The tests, with no network at all: a download from the Hub fails loudly instead of passing by luck.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
export HF_HUB_DISABLE_PROGRESS_BARS=1  # transformers' own bars (loading and writing weights) stay out of the log
export VLMCOURSE_CACHE="${VLMCOURSE_CACHE:-$(mktemp -d)/vlmcourse-cache}"
netless() {
  if [ "$(id -u)" = 0 ]; then unshare -n bash -c 'ip link set lo up; "$@"' _ "$@"
  else unshare -rn bash -c 'ip link set lo up; "$@"' _ "$@"; fi
}
t1=$(date +%s)
# Beside the base model (one torch thread), the four points of the 2 x 2 phase corner that 02_llava's test cell reads
# train into the same cache, two at a time (about two minutes each on one core), so that nbdev_test finds them.
# Together they take about 8 minutes on two cores.
corners_log=$(mktemp)
netless python bench/phase_diagram.py --corners --procs 2 >"$corners_log" 2>&1 &
corners=$!
netless vlmcourse train
echo "base model trained in $(( $(date +%s) - t1 )) s"
if ! wait "$corners"; then cat "$corners_log" >&2; echo "bench/phase_diagram.py --corners failed" >&2; exit 1; fi
echo "base model and 02_llava's phase corner trained in $(( $(date +%s) - t1 )) s"
t2=$(date +%s)
# One torch thread per process: two notebooks on two cores. More threads than cores make OpenMP spin-wait ~100x slower.
export OMP_NUM_THREADS=1
netless nbdev_test --n_workers 2 --timing  # each notebook's seconds, so the slow ones are seen
echo "nbdev_test took $(( $(date +%s) - t2 )) s"
netless python -m pytest tests -q -p no:cacheprovider
echo "tests/run.sh took $(( $(date +%s) - t0 )) s in all"
