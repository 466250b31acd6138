"""LaVIT's tokenizer and LM at the base model's alignment budget (11_lavit), one run per call, then the tables the notebook reads.

    for s in 0 1 2 3 4; do OMP_NUM_THREADS=1 python bench/lavit_experiment.py run --seed $s; done
    python bench/lavit_experiment.py run --seed 0 --threads 2
    python bench/lavit_experiment.py collect      # -> nbs/results/lavit_seeds.csv, lavit_tokenizer.csv

A run trains the visual tokenizer (its seed) and the LM from the base recipe's text stage of the same seed, on that
seed's stage-2 examples and steps (the base model of that seed was aligned on the same ones: nbs/results/base_seeds.csv),
measures kept tokens against objects on 600 held-out scenes, and `hallucination.base_figures` on 200 scenes of each kind
at the evaluation seed, as the base model's table was measured. Each run writes one JSON file under the course's cache folder (lavit-bench-runs/).
"""
import argparse, json, os, time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import pandas as pd
import torch

from vlmcourse.cache import cache_dir
from vlmcourse.world import render, sample_scenes
from vlmcourse.llava import BaseTrainConfig
from vlmcourse.hallucination import base_figures
from vlmcourse.lavit import (LavitConfig, VisualTokenizerConfig, answerer, objects_per_patch, patch_features, train_lavit,
                             train_visual_tokenizer, vision_tower)

RESULTS = Path(__file__).resolve().parents[1] / "nbs" / "results"
RUNS = cache_dir() / "lavit-bench-runs"  # one JSON per run, outside the repository

def run(seed: int, threads: int, n: int):
    torch.set_num_threads(threads)
    t0 = time.time()
    tcfg = VisualTokenizerConfig(seed=seed)
    vtok, th = train_visual_tokenizer(tcfg, progress=False)
    w = tcfg.clip.world
    scenes = sample_scenes(w, 600, seed=123)
    with torch.no_grad(): keep = vtok(patch_features(vision_tower(tcfg.clip), [render(s, w) for s in scenes], tcfg.clip))["keep"]
    n_obj = torch.tensor([len(s.objects) for s in scenes])
    on_obj = objects_per_patch(scenes, w)
    row = {"seed": seed, "threads": threads, **{f"tokenizer {k}": v for k, v in th["history"][-1].items() if k not in ("step", "quantised")},
           "tokenizer seconds": th["seconds"], "object patches kept": float(keep[on_obj].mean()), "background patches kept": float(keep[~on_obj].mean()),
           **{f"tokens, {k} objects": float(keep.sum(1)[n_obj == k].mean()) for k in (1, 2, 3)}}
    lm, proc, h = train_lavit(LavitConfig(tokenizer=tcfg, base=replace(BaseTrainConfig(), seed=seed)), visual_tokenizer=vtok, progress=False)
    row |= {"lm seconds": h["lm seconds"], "lm final loss": float(np.mean(h["losses"][-50:]))}
    t1 = time.time()
    row |= base_figures(answerer(lm, proc), w, n=n)
    row |= {"eval seconds": time.time() - t1, "seconds": time.time() - t0}
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / f"seed{seed}-threads{threads}.json").write_text(json.dumps({"row": row, "history": th["history"]}))
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})

def collect():
    rows, hist = [], []
    for f in sorted(RUNS.glob("*.json")):
        d = json.loads(f.read_text())
        rows.append(d["row"])
        hist += [{"seed": d["row"]["seed"], "threads": d["row"]["threads"], **r} for r in d["history"]]
    pd.DataFrame(rows).sort_values(["threads", "seed"]).to_csv(RESULTS / "lavit_seeds.csv", index=False)
    pd.DataFrame(hist).to_csv(RESULTS / "lavit_tokenizer.csv", index=False)
    print(pd.DataFrame(rows).sort_values(["threads", "seed"]).T)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "collect"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=200, help="evaluation scenes of each kind")
    a = ap.parse_args()
    run(a.seed, a.threads, a.n) if a.what == "run" else collect()
