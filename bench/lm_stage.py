"""What stage 0's copying is worth: the language model's colour and position lookups (`llava.lookup_accuracy`, text only,
200 typical scenes) after stage 0 with copying first (the course's recipe) and after as many steps of lookups alone.

    python bench/lm_stage.py                                   # seeds 0-4, both arms, one thread: about 12 minutes
    python bench/lm_stage.py --seeds 0 --write /tmp/lm.csv
    python bench/lm_stage.py --seeds 0 1 2 3 4 --write nbs/results/lm_stage.csv   # the table 02_llava shows

Each run trains stage 0 alone from a fresh model (`fresh_vlm`, `lm_stage`) and, for the recipe, stage 1 after it
(`caption_stage`), with and without the lookups stage 1 shuffles in, to show what keeps them.
"""
import argparse, time
from dataclasses import replace
import pandas as pd
import torch
from vlmcourse.llava import BaseTrainConfig, caption_stage, fresh_vlm, lm_stage, lookup_accuracy
from copy import deepcopy

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
ap.add_argument("--write", default=None, help="write the table as CSV here")
a = ap.parse_args()
torch.set_num_threads(1)
base = BaseTrainConfig()
steps = base.copy_steps + base.lookup_steps
arms = {"copying, then lookups": base, "lookups alone": replace(base, copy_steps=0, lookup_steps=steps)}
rows = []
for seed in a.seeds:
    for arm, t in arms.items():
        t = replace(t, seed=seed)
        t0 = time.time()
        model, proc = fresh_vlm(t)
        lm_stage(model, proc, t, progress=False)
        row = dict(seed=seed, arm=arm, steps=steps, seconds=time.time() - t0, **lookup_accuracy(model, proc, t.world))
        if arm.startswith("copying"):  # stage 1 after it: with its lookups, and on captions alone
            for name, t1 in (("after stage 1", t), ("after stage 1 on captions alone", replace(t, stage1_lookups=0))):
                m1 = deepcopy(model)
                caption_stage(m1, proc, t1, progress=False)
                row |= {f"{k} {name}": v for k, v in lookup_accuracy(m1, proc, t.world).items()}
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
df = pd.DataFrame(rows)
pd.set_option("display.width", 250)
print(df.round(3).to_string(index=False))
print(df.groupby("arm")[["colour", "position"]].agg(["mean", "min"]).round(3).to_string())
if a.write:
    df.to_csv(a.write, index=False)
    print(f"wrote {a.write}")
