"""CAL against plain cross-entropy in the alignment stage (08_cal): train each run once (cached), then evaluate them all
and write nbs/results/cal_seeds.csv, cal_curves.csv and cal_cost.csv, the files the notebook reads.

One run per call, so that a shared machine's CPU lock is released between runs:

    for s in 0 1 2; do for arm in ce cal; do
      OMP_NUM_THREADS=1 flock /tmp/vlmcourse-cpu.lock python bench/cal_experiment.py train --seed $s --arm $arm; done; done
    OMP_NUM_THREADS=1 flock /tmp/vlmcourse-cpu.lock python bench/cal_experiment.py evaluate
"""
import argparse, os, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import pandas as pd
import torch

from vlmcourse.cal import CALConfig, cal_curves, cal_experiment, cal_run_path, step_seconds
from vlmcourse.llava import AlignmentBatches, BaseTrainConfig, base_vlm, stage2_examples

RESULTS = Path(__file__).resolve().parents[1] / "nbs" / "results"

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("train", "evaluate"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arm", choices=("ce", "cal"), default="cal")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n_eval", type=int, default=200)
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    if a.what == "train":
        print(cal_run_path(BaseTrainConfig(), CALConfig() if a.arm == "cal" else None, a.seed, progress=False), f"{time.time() - t0:.0f} s")
        return
    seeds = tuple(int(s) for s in a.seeds.split(","))
    RESULTS.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(cal_experiment(seeds, a.n_eval, progress=False)).to_csv(RESULTS / "cal_seeds.csv", index=False)
    pd.DataFrame(cal_curves(seeds)).to_csv(RESULTS / "cal_curves.csv", index=False)
    tcfg = BaseTrainConfig()
    base, proc = base_vlm(tcfg, progress=False)
    ds = AlignmentBatches(proc, tcfg.world, stage2_examples(tcfg, 40 * tcfg.batch_size, seed=5), tcfg.batch_size)
    cost = step_seconds(base, [ds[k] for k in range(len(ds))])
    pd.DataFrame([cost]).to_csv(RESULTS / "cal_cost.csv", index=False)
    print(cost, f"{time.time() - t0:.0f} s")

if __name__ == "__main__":
    main()
