"""PixelLLM's point loss against the same budget without it (10_pixelllm): train each run once (cached), then evaluate
them all and write nbs/results/pixelllm_seeds.csv and pixelllm_hallucinated.csv, the files the notebook reads.

One run per call, so that a shared machine's CPU slot is released between runs:

    for s in 0 1 2 3 4; do for w in 0 0.1 1; do
      OMP_NUM_THREADS=1 python bench/pixelllm_experiment.py train --seed $s --weight $w; done; done
    OMP_NUM_THREADS=1 python bench/pixelllm_experiment.py evaluate --weights 0,0.1,1

(lambda = 1 is the lesson's recipe, 0 the control with the same budget, 0.1 PixelLLM's weight.)
"""
import argparse, os, time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import pandas as pd
import torch

from vlmcourse.hallucination import EVAL_SEED, evaluate_captions
from vlmcourse.llava import answerer, base_vlm
from vlmcourse.pixelllm import PixelTrainConfig, load_pixelllm, pixel_report, pixelllm_run_path
from vlmcourse.world import sample_scenes

RESULTS = Path(__file__).resolve().parents[1] / "nbs" / "results"

def config(seed, weight): return replace(PixelTrainConfig(), seed=seed, point_weight=weight)

def arm_name(weight): return f"point loss, lambda = {weight:g}" if weight else "control, lambda = 0"

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("train", "evaluate"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight", type=float, default=PixelTrainConfig().point_weight)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--weights", default="0,0.1,1")
    ap.add_argument("--n_eval", type=int, default=200)
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    if a.what == "train":
        print(pixelllm_run_path(config(a.seed, a.weight), progress=False), f"{time.time() - t0:.0f} s")
        return
    wcfg = PixelTrainConfig().base.world
    base, bproc = base_vlm(progress=False)
    rows = [dict(run="base", seed=-1, point_weight=float("nan"),
                 **{f"{k}/chair_s": evaluate_captions(answerer(base, bproc), sample_scenes(wcfg, a.n_eval, seed=EVAL_SEED, kind=k), wcfg)["chair_s"]
                    for k in ("typical", "counter")})]
    where = []
    for seed in (int(s) for s in a.seeds.split(",")):
        for w in (float(x) for x in a.weights.split(",")):
            path = pixelllm_run_path(config(seed, w), progress=False)
            hist = pd.read_json(path / "history.json", typ="series")
            model, proc = load_pixelllm(path, device="cpu")
            figs, words, _ = pixel_report(model, proc, wcfg, n=a.n_eval)
            rows.append(dict(run=arm_name(w), seed=seed, point_weight=w, seconds=hist["seconds"],
                             final_caption_loss=float(np.mean(hist["caption"][-50:])), final_point_loss=float(np.mean(hist["point"][-50:])), **figs))
            for r in words:
                if r["status"] == "hallucinated" and r["type"] == "shape":
                    where.append(dict(run=rows[-1]["run"], seed=seed, point_weight=w, shape=r["shape"], where=r["where"], named_empty=r["named_empty"], in_its_place=r["in_its_place"]))
            print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(RESULTS / "pixelllm_seeds.csv", index=False)
    pd.DataFrame(where).to_csv(RESULTS / "pixelllm_hallucinated.csv", index=False)
    print(f"{time.time() - t0:.0f} s")

if __name__ == "__main__":
    main()
