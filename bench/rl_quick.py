"""The claims 12_rl asserts under nbdev_test (30 GRPO steps), checked on several seeds and thread counts:
counter-prior CHAIR_s of the policy at least 0.05 below the base model's on 100 held-out scenes, the share of groups whose
answers all score the same above 25%, and a KL to the base model above 0.01.

    python bench/rl_quick.py --seeds 0 1 2 3 4 --threads 1
    python bench/rl_quick.py --seeds 0 1 --threads 2"""
import argparse

import numpy as np
import torch

from vlmcourse.hallucination import EVAL_SEED, evaluate_captions
from vlmcourse.llava import BaseTrainConfig, answerer, base_vlm
from vlmcourse.rl import GRPOTrainConfig, grpo_train, kl_to_base
from vlmcourse.world import sample_scenes

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--steps", type=int, default=30)
a = p.parse_args()
torch.set_num_threads(a.threads)
base, proc = base_vlm(progress=False)
wcfg = BaseTrainConfig().world
scenes = sample_scenes(wcfg, 100, seed=EVAL_SEED + 1, kind="counter")
base_chair = evaluate_captions(answerer(base, proc), scenes, wcfg)["chair_s"]
for seed in a.seeds:
    model, _, h = grpo_train(GRPOTrainConfig(max_steps=a.steps, seed=seed), progress=False)
    c = evaluate_captions(answerer(model, proc), scenes, wcfg)
    kl = kl_to_base(model, base, proc, wcfg, n=30)
    ok = c["chair_s"] < base_chair - 0.05 and np.mean(h["zero_std"]) > 0.25 and kl > 0.01
    print(f"threads {a.threads} seed {seed}: counter CHAIR_s {c['chair_s']:.3f} (base {base_chair:.3f}), recall {c['recall']:.3f}, "
          f"zero-std groups {np.mean(h['zero_std']):.2f}, KL {kl:.3f}, {h['seconds_total']:.1f} s: {'holds' if ok else 'FAILS'}", flush=True)
