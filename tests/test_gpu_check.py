"tools/gpu_check.py, the GPU paths' check: a clear skip without a GPU, and its checks run (on the CPU here) so that it does not rot."
import subprocess, sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there: the script checks it instead of skipping")
def test_without_a_gpu_it_says_so_in_one_line_and_passes():
    out = run()
    assert out.returncode == 0 and out.stdout.strip().startswith("SKIP") and len(out.stdout.strip().splitlines()) == 1


def test_its_llava_and_dpo_checks_pass_on_the_cpu():
    out = run("--cpu", "--only", "llava,dpo")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "0 failed" in out.stdout and out.stdout.count("PASS") >= 6
