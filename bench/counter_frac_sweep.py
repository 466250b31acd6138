"""BPO's claim where it applies: preference pairs on scenes that follow the prior (in-distribution positives) against
today's half counter-prior pairs. For each share of counter-prior scenes in the pairs: SFT on the chosen answers, DPO + SFT
on BPO's injected and noised negatives, from the same base model; each run's counter-prior CHAIR_s and POPE, the share of
the base-to-oracle gap it closes, and Welch's t-test of DPO + SFT against SFT where there are 2 seeds or more.

    python bench/counter_frac_sweep.py --seeds 0 1 2 3 4 --fracs 0 0.5 --write nbs/results/counter_frac_sweep.csv
    python bench/counter_frac_sweep.py --seeds 0 1 2 3 4 --kinds "DPO + SFT, SeVa" --also old.csv --write all.csv  # add runs
    python bench/counter_frac_sweep.py --seeds 1 2 --also seed0.csv --write all.csv   # pool with an earlier run's seeds

The sweep is cached (07_preference's `run_sweep`), so a rerun with the same arguments only prints."""
import argparse

import pandas as pd

from vlmcourse.hallucination import hallucination_report
from vlmcourse.llava import answerer, oracle_vlm
from vlmcourse.preference import (SWEEP_KINDS, add_gap_closed, counter_frac_runs, pick_best, pool_runs, run_sweep,
                                  sweep_markdown)

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--seeds", type=int, nargs="+", default=[0])
p.add_argument("--fracs", type=float, nargs="+", default=[0.0, 0.5], help="shares of counter-prior scenes in the pairs")
p.add_argument("--n-pairs", type=int, default=1500)
p.add_argument("--kinds", nargs="+", default=list(SWEEP_KINDS), help="which runs of preference.SWEEP_KINDS (default: all)")
p.add_argument("--n-eval", type=int, default=200, help="evaluation scenes of each kind")
p.add_argument("--write", default=None, help="CSV of every run's figures")
p.add_argument("--also", nargs="*", default=[], help="CSVs written by earlier runs of this script (other seeds) to pool with this one")
a = p.parse_args()

runs = counter_frac_runs(a.fracs, a.n_pairs, a.kinds)
rows = run_sweep(runs, seeds=a.seeds, n_eval=a.n_eval)
oracle = dict(run="oracle", seed=-1, **hallucination_report(answerer(*oracle_vlm(progress=False)), next(iter(runs.values())).base.world, n=a.n_eval))
df = pd.DataFrame(rows + [oracle])
df = pool_runs(df, a.also)  # other runs or seeds; the base model, the oracle and any (run, seed) run again are this run's
order = ["base"] + list(counter_frac_runs(sorted({float(r.rpartition(" ")[2]) for r in df.run if ", counter " in r}), a.n_pairs)) + ["oracle"]
df = df.sort_values("run", key=lambda col: col.map(order.index), kind="stable").reset_index(drop=True)  # the course's order of runs
df = add_gap_closed(df)
print(sweep_markdown(df))  # the table, Welch's tests and the rule's best run, as 07_preference writes them into the README
print("the best DPO + SFT run:", pick_best(df, prefix="DPO + SFT"))
if a.write: df.to_csv(a.write, index=False)
