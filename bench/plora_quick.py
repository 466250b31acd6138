"""The 09_plora quick run (the nbdev_test size: 300 alignment steps, 60 scenes) for several alignment seeds, to check
that the directions the lesson asserts hold beyond seed 0. Usage: OMP_NUM_THREADS=1 python bench/plora_quick.py [steps] [seeds...]"""
import os, sys
from dataclasses import replace

import pandas as pd
import torch

from vlmcourse.llava import BaseTrainConfig, text_stage_vlm
from vlmcourse.plora import ALIGN_ARMS, align_arm, measure_vlm, text_perplexity

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
threads = int(os.environ.get("PLORA_THREADS", "1"))  # torch threads for training
seeds = [int(s) for s in sys.argv[2:]] or [0, 1, 2, 3, 4]
torch.set_num_threads(1)
tcfg = BaseTrainConfig()
start, proc = text_stage_vlm(tcfg, progress=False)
before = text_perplexity(start, proc, tcfg.world)
rows = []
for seed in seeds:
    acfg = replace(tcfg, seed=seed)  # the alignment data's order and the adapters' init; the text stage is the course's
    for how in ALIGN_ARMS:
        m, h = align_arm(start, proc, how, acfg, steps=steps, progress=False, threads=threads)
        rows.append({"seed": seed, "threads": threads, "arm": how, "trainable": h["trainable"], "seconds": round(h["seconds"], 1),
                     "final loss": sum(h["losses"][-20:]) / 20, **measure_vlm(m, proc, tcfg.world, n=60), "perplexity before": before})
        print(rows[-1], flush=True)
df = pd.DataFrame(rows)
df["perplexity change"] = df["text perplexity"] / df["perplexity before"] - 1
print(df.to_string())
