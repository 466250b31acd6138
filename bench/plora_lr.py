"""09_plora: the adapters' learning rate (and rank), LoRA and PLoRA from the text stage's model.
Usage: OMP_NUM_THREADS=1 python bench/plora_lr.py STEPS ARM:LR[:R] ...
The lesson's table: OMP_NUM_THREADS=1 python bench/plora_lr.py 1000 PLoRA:5e-3 PLoRA:1.5e-2 LoRA:5e-3 PLoRA:5e-3:32"""
import sys

import pandas as pd
import torch

from vlmcourse.llava import BaseTrainConfig, text_stage_vlm
from vlmcourse.plora import PLoRAConfig, align_arm, measure_vlm

torch.set_num_threads(1)
steps = int(sys.argv[1])
tcfg = BaseTrainConfig()
start, proc = text_stage_vlm(tcfg, progress=False)
rows = []
for spec in sys.argv[2:]:
    arm, lr, *r = spec.split(":")
    r = int(r[0]) if r else 8
    m, h = align_arm(start, proc, arm, tcfg, PLoRAConfig(r=r, alpha=float(r)), steps=steps, adapter_lr=float(lr), progress=False)
    rows.append({"arm": arm, "adapter_lr": float(lr), "r": r, "steps": steps, "trainable": h["trainable"], "seconds": round(h["seconds"], 1),
           "final loss": round(h["final loss"], 4), **{k: round(v, 4) for k, v in measure_vlm(m, proc, tcfg.world, n=100).items()}})
    print(rows[-1], flush=True)
pd.DataFrame(rows).to_csv("nbs/results/plora_lr.csv", index=False)  # what 09_plora shows; run from the repository root
