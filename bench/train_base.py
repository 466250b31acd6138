"""Time the base model's two-stage training on this machine, and measure what it learned.

    python bench/train_base.py [--stage2-steps 2500]

Trains from scratch (it does not use the cache), prints seconds per stage, exact-caption accuracy on typical
scenes and CHAIR_s on counter-prior scenes. The issue's bar: at most 3 minutes on a 2-core CPU.
"""
import argparse, time
from dataclasses import replace
import numpy as np
import torch
from vlmcourse.world import sample_scenes, render, caption
from vlmcourse.llava import BaseTrainConfig, train_base, describe, mentioned_shapes

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--stage2-steps", type=int, default=None)
ap.add_argument("--n-eval", type=int, default=200)
a = ap.parse_args()
tcfg = BaseTrainConfig() if a.stage2_steps is None else replace(BaseTrainConfig(), stage2_steps=a.stage2_steps)
t0 = time.time()
model, proc, hist = train_base(tcfg, progress=False)
total = time.time() - t0
w = tcfg.world
print(f"threads=1 (train_base pins one) stage1_steps={len(hist['stage1'])} stage2_steps={len(hist['stage2'])}")
print(f"training time: {total:.1f} s  (bar: <= 180 s)")
for kind in ("typical", "counter"):
    scs = sample_scenes(w, a.n_eval, seed=99, kind=kind)
    t = time.time(); caps = describe(model, proc, [render(s, w) for s in scs]); g = time.time() - t
    exact = np.mean([c == caption(s, w) for c, s in zip(caps, scs)])
    chair_s = np.mean([bool(mentioned_shapes(c, w) - s.shapes) for c, s in zip(caps, scs)])
    print(f"{kind:8s} exact={exact:.3f} chair_s={chair_s:.3f}  ({a.n_eval} captions in {g:.1f} s)")
