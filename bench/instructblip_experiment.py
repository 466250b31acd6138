"""04_instructblip's experiment: instruction-aware Q-Former against a BLIP-2-style one, and LLaVA at the same budget.

    python bench/instructblip_experiment.py --write nbs/results/instructblip_seeds.csv     # seeds 0-2, ~10 min on one core
    python bench/instructblip_experiment.py --seeds 0 --steps 200 --n 40                   # a quick look

Per seed and arm: held-in and held-out task accuracy (`task_accuracy`, 100 examples per family, evaluation seed 1000),
CHAIR on counter-prior scenes and POPE's adversarial split on typical and counter-prior scenes. Trains from scratch
(not from the cache), one torch thread per run.
"""
import argparse, time
from dataclasses import replace
import numpy as np, pandas as pd
from vlmcourse.instructblip import InstructTuneConfig, instruct_tune, instructblip_answerer, llava_same_budget, task_accuracy, TASK_FAMILIES
from vlmcourse.llava import answerer
from vlmcourse.hallucination import evaluate_captions, evaluate_pope
from vlmcourse.world import sample_scenes

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
ap.add_argument("--steps", type=int, default=None, help="default: InstructTuneConfig's")
ap.add_argument("--n", type=int, default=100, help="examples per task family and scenes of each kind")
ap.add_argument("--no-llava", action="store_true")
ap.add_argument("--write", default=None)
a = ap.parse_args()

rows = []
for seed in a.seeds:
    base = InstructTuneConfig(seed=seed) if a.steps is None else InstructTuneConfig(seed=seed, steps=a.steps)
    w = base.base.world
    arms = [("InstructBLIP", replace(base, instruction_aware=True)), ("BLIP-2 style", replace(base, instruction_aware=False))]
    if not a.no_llava: arms.append(("LLaVA", base))
    for arm, cfg in arms:
        t0 = time.time()
        if arm == "LLaVA":
            m, p, losses = llava_same_budget(cfg, progress=False)
            ans = answerer(m, p)
        else:
            m, p, h = instruct_tune(cfg, progress=False)
            losses, ans = h["loss"], instructblip_answerer(m, p)
        secs = time.time() - t0
        acc = task_accuracy(ans, w, TASK_FAMILIES, n=a.n)
        row = dict(seed=seed, arm=arm, steps=cfg.steps, held_out=cfg.held_out, seconds=secs, final_loss=float(np.mean(losses[-50:])))
        row |= {f"acc_{f}": v for f, v in acc.items()}
        row["held_in_mean"] = float(np.mean([acc[f] for f in cfg.held_in]))
        typ, ctr = (sample_scenes(w, a.n, seed=1000, kind=k) for k in ("typical", "counter"))
        c = evaluate_captions(ans, ctr, w)
        row |= {"counter_chair_s": c["chair_s"], "counter_chair_i": c["chair_i"]}
        for kind, scs in (("typical", typ), ("counter", ctr)):
            r = evaluate_pope(ans, scs, w, "adversarial")
            row |= {f"{kind}_pope_adv_acc": r["accuracy"], f"{kind}_pope_adv_yes": r["yes_ratio"]}
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
df = pd.DataFrame(rows)
print(df.groupby("arm").mean(numeric_only=True).round(3).T)
if a.write: df.to_csv(a.write, index=False)
