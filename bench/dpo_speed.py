"""DPO training speed: TRL's `DPOTrainer` against the course's `dpo_train`, on the same pairs and the same tiny LLaVA;
and a DPO step against an SFT step (`07_preference`'s `sft_train`) on the same pairs.

Both run the same hyper-parameters (`trl_dpo_config` maps `DPOTrainConfig` to TRL's `DPOConfig`: float32, no
activation checkpointing, cosine schedule with warm-up, clipping) and both score the same tokens (`for_trl`). The
difference is what each does per step: TRL collates (tokenises and processes the images) and runs the reference model
at every step, since it refuses `precompute_ref_log_probs` for vision data; `dpo_train` tokenises every pair once and
computes the reference log-probabilities once per pair. Times are end to end (trainer construction, tokenisation,
reference pass and training), alternating the trainers to share out the noise of a busy machine. `dpo_train` runs each
pair's image and prompt once for both answers (`pair_logps`); "dpo_train, whole sequences" is the same loop scoring
each answer as a whole sequence (`sequence_logps`), as it did before, to show what sharing the prefix is worth.

    python bench/dpo_speed.py                    # 512 pairs, 2 epochs, 16 pairs a step, 3 repeats, 1 thread: about a minute
    python bench/dpo_speed.py --pairs 1024 --batch-size 32 --threads 2
"""
import argparse
import copy
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging as hf_logging

from vlmcourse.dpo import DPOTrainConfig, dpo_train, for_trl, preference_dataset, trl_dpo_config
from vlmcourse.llava import LlavaModelConfig, build_processor, build_vlm
from vlmcourse.world import CAPTION_PROMPT, WorldConfig, caption, render, sample_scenes


def make_pairs(wcfg, n, seed=0):
    "Counter-prior scenes; chosen = the true caption, rejected = a typical scene's caption."
    scenes = sample_scenes(wcfg, n, seed=seed, kind="counter")
    others = sample_scenes(wcfg, n, seed=seed + 1, kind="typical")
    return preference_dataset([render(s, wcfg) for s in scenes], [CAPTION_PROMPT] * n, [caption(s, wcfg) for s in scenes],
                              [caption(o, wcfg) for o in others], source="bench")


def run_trl(model, proc, pairs, cfg):
    from trl import DPOTrainer
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        trainer = DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), train_dataset=for_trl(pairs, proc),
                             processing_class=proc, args=trl_dpo_config(cfg, d, logging_steps=10))
        for cb in (PrinterCallback, ProgressCallback): trainer.remove_callback(cb)
        trainer.train()
    return time.perf_counter() - t0, trainer.state.log_history[0]["loss"]


def run_ours(model, proc, pairs, cfg):
    t0 = time.perf_counter()
    h = dpo_train(copy.deepcopy(model), proc, pairs, cfg, progress=False)
    run_ours.step = (h["seconds"] - h["ref_seconds"]) / h["steps"]
    return time.perf_counter() - t0, sum(h["loss"][:10]) / len(h["loss"][:10])


def run_ours_whole(model, proc, pairs, cfg):
    import vlmcourse.dpo as dpo
    shares, dpo._shares_prefix = dpo._shares_prefix, lambda m: False
    try: return run_ours(model, proc, pairs, cfg)
    finally: dpo._shares_prefix = shares


def run_sft(model, proc, pairs, cfg):
    from vlmcourse.preference import sft_train
    t0 = time.perf_counter()
    h = sft_train(copy.deepcopy(model), proc, pairs, cfg, progress=False)
    run_sft.step = h["seconds"] / h["steps"]
    return time.perf_counter() - t0, sum(h["loss"][:10]) / len(h["loss"][:10])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=512, help="preference pairs")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=DPOTrainConfig.batch_size, help="pairs per step")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each trainer, alternating; the median is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads: a tiny model gains little from more, and one is steadier on a shared machine")
    args = ap.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    from datasets.utils.logging import disable_progress_bar
    disable_progress_bar()

    wcfg, mcfg = WorldConfig(), LlavaModelConfig()
    proc = build_processor(wcfg, mcfg)
    model = build_vlm(proc, mcfg, seed=0)
    pairs = make_pairs(wcfg, args.pairs)
    cfg = DPOTrainConfig(epochs=args.epochs, batch_size=args.batch_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.pairs} pairs x {args.epochs} epochs, {args.batch_size} pairs a step; tiny LLaVA with {n_params:,} parameters; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")

    runners = (("TRL DPOTrainer", run_trl), ("vlmcourse dpo_train", run_ours), ("dpo_train, whole sequences", run_ours_whole),
               ("SFT on the chosen", run_sft))
    times, steps = {name: [] for name, _ in runners}, {"dpo": [], "sft": []}
    for r in range(args.repeats):
        for name, fn in runners:
            s, first = fn(model, proc, pairs, cfg)
            times[name].append(s)
            if fn is run_ours: steps["dpo"].append(run_ours.step)
            if fn is run_sft: steps["sft"].append(run_sft.step)
            print(f"  run {r + 1}: {name:28s} {s:6.1f} s  {args.pairs * args.epochs / s:6.1f} pairs/s  (mean loss of the first logged steps {first:.4f})")
    rate = {k: args.pairs * args.epochs / statistics.median(v) for k, v in times.items()}
    print()
    for k, v in rate.items(): print(f"{k:28s} {v:7.1f} pairs/s  (median of {args.repeats})")
    print(f"ratio dpo_train / DPOTrainer: {rate['vlmcourse dpo_train'] / rate['TRL DPOTrainer']:.2f}x")
    print(f"ratio dpo_train / dpo_train on whole sequences (what the shared prefix is worth): {rate['vlmcourse dpo_train'] / rate['dpo_train, whole sequences']:.2f}x")
    dpo_step, sft_step = statistics.median(steps["dpo"]), statistics.median(steps["sft"])
    print(f"a DPO step {dpo_step * 1000:.1f} ms, an SFT step on the same pairs {sft_step * 1000:.1f} ms: {dpo_step / sft_step:.2f}x")


if __name__ == "__main__":
    main()
