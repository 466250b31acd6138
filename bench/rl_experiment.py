"""GRPO against the best DPO + SFT run of 07_preference at equal wall-clock compute on this machine, several seeds.

For each seed: 07's best DPO + SFT run (`pick_best` with prefix 'DPO + SFT' on 07's committed sweep) is trained from the
base model and timed (pairs built and trained); then GRPO (TRL's GRPOTrainer, 12_rl's reward) gets the same wall-clock budget,
once with the lesson's reward weights and once with `named = 0` (nothing rewards naming a true object: the reward hack's
setting), and once with four times the budget (what more compute buys). Every model is measured with 03_hallucination's report (CHAIR and recall on typical and counter-prior scenes,
POPE's three splits on both kinds of scene) and 12_rl's KL to the base model.

    python bench/rl_experiment.py --seeds 0 1 2 3 4 --write nbs/results/rl_seeds.csv --curves nbs/results/rl_curves.csv
    python bench/rl_experiment.py --seeds 3 4 --write b.csv --curves bc.csv   # on the other core, then pool:
    python bench/rl_experiment.py --seeds 0 1 2 --also b.csv --also-curves bc.csv --write nbs/results/rl_seeds.csv ...

Run it with OMP_NUM_THREADS=1 on an otherwise idle core, so both arms see the same CPU."""
import argparse, time
from dataclasses import replace

import pandas as pd

from vlmcourse.hallucination import hallucination_report
from vlmcourse.llava import BaseTrainConfig, answerer, base_vlm, oracle_vlm
from vlmcourse.preference import align, counter_frac_runs, pick_best, pool_runs
from vlmcourse.rl import GRPOTrainConfig, RewardConfig, grpo_train, kl_to_base

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
p.add_argument("--n-eval", type=int, default=200, help="evaluation scenes of each kind")
p.add_argument("--n-kl", type=int, default=100, help="held-out prompts for the KL to the base model")
p.add_argument("--write", default="nbs/results/rl_seeds.csv")
p.add_argument("--curves", default="nbs/results/rl_curves.csv")
p.add_argument("--sweep", default="nbs/results/counter_frac_sweep.csv", help="07's sweep, from which pick_best names the DPO + SFT run")
p.add_argument("--also", nargs="*", default=[], help="rows written by another run of this script (other seeds) to pool with these")
p.add_argument("--also-curves", nargs="*", default=[], help="that run's curves")
a = p.parse_args()

against = pick_best(pd.read_csv(a.sweep), prefix="DPO + SFT")  # the lowest counter CHAIR_s among DPO + SFT runs that keep typical scenes
acfg = counter_frac_runs((float(against.rpartition(" ")[2]),))[against]
print("DPO + SFT run:", against, flush=True)
tcfg = BaseTrainConfig()
wcfg = tcfg.world
base, proc = base_vlm(tcfg, progress=False)

def measure(run, seed, model, extra):
    ans = answerer(model, proc)
    row = dict(run=run, seed=seed, **extra, **hallucination_report(ans, wcfg, n=a.n_eval))
    row["kl_to_base"] = kl_to_base(model, base, proc, wcfg, n=a.n_kl)
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k.split("/")[-1] in
           ("run", "seed", "seconds", "steps", "chair_s", "exact", "recall", "accuracy", "kl_to_base")}, flush=True)
    return row

rows, curves = [], []
rows.append(measure("base", -1, base, {}))
rows.append(measure("oracle", -1, oracle_vlm(tcfg, progress=False)[0], {}))
for seed in a.seeds:
    t0 = time.time()
    model, _, hist = align(replace(acfg, seed=seed), progress=False)
    budget = time.time() - t0  # pairs built, reference log-probs and training: the whole run
    rows.append(measure("DPO + SFT", seed, model, dict(seconds=budget, steps=hist["steps"], config=against)))
    for run, reward, scale in (("GRPO", RewardConfig(), 1), ("GRPO, named = 0", RewardConfig(named=0.0), 1), ("GRPO, 4x compute", RewardConfig(), 4)):
        model, _, h = grpo_train(GRPOTrainConfig(seconds=scale * budget, max_steps=int(10 * scale * budget) + 10,  # the budget stops it first (about 5 steps/s)
                                                   reward=reward, seed=seed), tcfg, progress=False)
        rows.append(measure(run, seed, model, dict(seconds=h["seconds_total"], steps=h["steps"])))
        curves += [dict(run=run, seed=seed, step=s, reward=r, kl=k, completion_length=c, seconds=t)
                   for s, r, k, c, t in zip(h["step"], h["reward"], h["kl"], h["completion_length"], h["seconds"])]
    pd.DataFrame(rows).to_csv(a.write, index=False)  # after every seed, so that a long run leaves its finished seeds
    pd.DataFrame(curves).to_csv(a.curves, index=False)
df, cv = pd.DataFrame(rows), pd.DataFrame(curves)
df = pool_runs(df, a.also)  # other seeds; the base model and the oracle are this run's
cv = pool_runs(cv, a.also_curves, skip=())
if a.also or a.also_curves:
    df.to_csv(a.write, index=False)
    cv.to_csv(a.curves, index=False)
cols = ["seconds", "steps", "counter/chair_s", "counter/recall", "typical/exact", "typical/recall", "pope_adversarial/accuracy",
        "typical_pope_adversarial/accuracy", "kl_to_base"]
print(df.groupby("run", sort=False)[cols].agg(["mean", "std"]).round(3).to_string())
