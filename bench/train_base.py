"""Train the base model on several seeds and thread counts, time each stage, and hold each run to the course's bar.

    python bench/train_base.py                      # seeds 0-4 with 1 thread, seeds 0-1 with 2 threads, the oracle
    python bench/train_base.py --seeds 0 --two-thread-seeds --no-oracle   # one seed, quickly
    python bench/train_base.py --write nbs/results/base_seeds.csv   # the table 02_llava shows

Trains from scratch (not from the cache). Prints seconds and examples per second of each stage, the figures of
`hallucination.base_figures` for every run (on --n scenes of each kind, evaluation seed 1000), whether each meets
`BASE_BAR`, and, measured in the same run on the same first 200 stage-2 steps, the ratio of the course's
tokenise-once data path against building every batch with the processor (`sft_batch`).
Run it on an otherwise idle machine: another busy process slows a torch thread many times over.
"""
import argparse, time
from dataclasses import replace
from pathlib import Path
import pandas as pd
import torch
from vlmcourse.world import render
from vlmcourse.llava import (AlignmentBatches, answerer, BaseTrainConfig, build_processor, build_vlm, oracle_config, sft_batch,
                             stage2_examples, train_base, train_loop, _batch_stream)
from vlmcourse.hallucination import BASE_BAR, base_figures, meets_bar

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4], help="seeds trained with 1 thread")
ap.add_argument("--two-thread-seeds", type=int, nargs="*", default=[0, 1], help="seeds trained again with 2 threads")
ap.add_argument("--no-oracle", action="store_true", help="skip the oracle (the same recipe without the prior)")
ap.add_argument("--oracle-seeds", type=int, nargs="*", default=[0, 1], help="oracle seeds (oracle_vlm() keeps the first that reads the world)")
ap.add_argument("--n", type=int, default=200, help="evaluation scenes of each kind")
ap.add_argument("--speed-steps", type=int, default=200, help="stage-2 steps timed for the data-path comparison (0: skip)")
ap.add_argument("--write", default=None, help="write the table as CSV here")
a = ap.parse_args()
base = BaseTrainConfig()
B = base.batch_size

if a.speed_steps:
    proc = build_processor(base.world, base.model)
    ex = stage2_examples(base, a.speed_steps * B, seed=2)
    def per_step(k):
        chunk = ex[k * B:(k + 1) * B]
        return sft_batch(proc, [render(s, base.world) for s, _, _ in chunk], [q for _, q, _ in chunk], [a_ for _, _, a_ in chunk])
    times = {}
    torch.set_num_threads(1)
    for name in ("processor every step", "tokenised once, 1 worker"):
        model = build_vlm(proc, base.model, seed=0)
        t = time.time()
        make = per_step if name.startswith("processor") else _batch_stream(AlignmentBatches(proc, base.world, ex, B), 1)
        train_loop(model, make, a.speed_steps, base.stage2_lr, progress=False)
        times[name] = time.time() - t
    print(f"stage-2 data path, first {a.speed_steps} steps: " + ", ".join(f"{k} {v:.1f} s ({a.speed_steps * B / v:.0f} ex/s)" for k, v in times.items())
          + f"; speed-up {times['processor every step'] / times['tokenised once, 1 worker']:.2f}x")

runs = [(f"seed {s}, 1 thread", replace(base, seed=s), 1) for s in a.seeds]
runs += [(f"seed {s}, 2 threads", replace(base, seed=s), 2) for s in a.two_thread_seeds]
if not a.no_oracle: runs += [(f"oracle, seed {s}", replace(oracle_config(base), seed=s), 1) for s in a.oracle_seeds]
rows = {}
for name, tcfg, threads in runs:
    model, proc, hist = train_base(tcfg, progress=False, threads=threads)
    s0, s1, s2 = hist["stage0_seconds"], hist["stage1_seconds"], hist["stage2_seconds"]
    torch.set_num_threads(1)
    fig = base_figures(answerer(model, proc), base.world, n=a.n)
    ok = meets_bar(fig)
    stages = {f"stage {k} seconds": hist[f"stage{k}_seconds"] for k in (0, 1, 2)}
    rows[name] = {"seconds": hist["seconds"], **stages, **fig, "meets bar": all(ok.values()) if not name.startswith("oracle") else None}
    print(f"{name}: stage 0 {s0:.1f} s ({len(hist['stage0']) * B / max(s0, 1e-9):.0f} ex/s), "
          f"stage 1 {s1:.1f} s ({len(hist['stage1']) * B / s1:.0f} ex/s), stage 2 {s2:.1f} s ({len(hist['stage2']) * B / s2:.0f} ex/s); "
          + ", ".join(f"{k} {v:.3f}" for k, v in fig.items()) + f"; misses: {[k for k, v in ok.items() if not v]}", flush=True)
table = pd.DataFrame(rows).T
pd.set_option("display.width", 250)
print(table.drop(columns=["meets bar"]).astype(float).round(3).T.to_string())
print("bar:", {k: f"{op} {v}" for k, (op, v) in BASE_BAR.items()})
if a.write:
    Path(a.write).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(a.write)
    print(f"wrote {a.write}")
