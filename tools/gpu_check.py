"""Check the course's GPU code paths on a CUDA machine, offline, in a few minutes: no Hub, no cache, tiny models built
from configs. One PASS/FAIL/SKIP line per check, with its numbers; exits 1 if any check failed, 0 otherwise (and 0, after
one line, on a machine without a CUDA GPU).

    python tools/gpu_check.py                    # every check
    python tools/gpu_check.py --only llava,dpo   # some of them: llava, dpo, families, align
    python tools/gpu_check.py --cpu              # the same code on the CPU: a smoke test of this script

The checks:
  llava     the course's tiny LLaVA (`fresh_vlm`, no CLIP init) on the GPU: `generate` in float32 and bfloat16, SFT steps
            (`sft_batch`, `train_loop`), and a `save_vlm` / `load_vlm` round trip (the GPU default: bfloat16 on cuda)
  dpo       the DPO log-probabilities (`sequence_logps`, `pair_logps`) on the GPU against the CPU's in float32, and
            `dpo_train`'s losses on the GPU against the CPU's; `dpo_train` in bfloat16
  families  `tiny_vlm(arch)` of each real family: `generate` in bfloat16 on the GPU, and `sequence_logps` of an `sft_batch`
            on the GPU against the CPU's
  align     `vlmcourse align` (TRL's DPOTrainer with a LoRA adapter, bf16 on the GPU) on tiny checkpoints, a few steps,
            run as the command line runs it (LLaVA, SmolVLM's Idefics3, Qwen2-VL when torchvision is installed); for
            LLaVA also under `accelerate launch --num_processes 1` with configs/accelerate_multi_gpu.yaml; then the
            merged model is loaded and asked a question
"""
import argparse, copy, math, os, re, shutil, subprocess, sys, tempfile, time, traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TMP = Path(tempfile.mkdtemp(prefix="vlmcourse-gpu-check-"))
# No Hub and no cache: everything is built here, and whatever a library would cache goes to a temporary folder
for k, v in dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(TMP / "hf"),
                 VLMCOURSE_CACHE=str(TMP / "vlmcourse-cache"), TOKENIZERS_PARALLELISM="false").items():
    os.environ[k] = v
# The project importable without installing it, here and in the commands started below (paths made absolute)
_pp = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
os.environ["PYTHONPATH"] = os.pathsep.join(_pp + ([str(ROOT)] if str(ROOT) not in _pp else []))
if str(ROOT) not in sys.path: sys.path.append(str(ROOT))

import torch

RESULTS = []  # (check, status)
T0 = time.time()


def report(name: str, ok, detail: str):
    "One line per check: PASS, FAIL or SKIP (ok=None), its name and its numbers."
    status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    RESULTS.append((name, status))
    print(f"{status} {name}: {detail}", flush=True)


def run_check(name: str, fn, *args):
    "Run one check; an exception is a FAIL with its last lines."
    t = time.time()
    try: fn(*args)
    except Exception as e:
        tb = traceback.format_exc().strip().splitlines()
        ours = [f"{l.strip()}: {tb[k + 1].strip()}" for k, l in enumerate(tb[:-1])
                if l.strip().startswith("File ") and ("vlmcourse" + os.sep in l or "gpu_check" in l)]
        print("\n".join(["  in: " + o for o in ours] + tb[-8:]), flush=True)
        report(name, False, f"raised {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''} "
                            f"({time.time() - t:.1f} s)")


def finite(xs) -> bool: return all(math.isfinite(x) for x in xs)


def fmt(xs) -> str: return "[" + ", ".join(f"{x:.4f}" for x in xs) + "]"


def to_dev(batch: dict, dev, dtype=None) -> dict:
    "A batch on `dev`, its floating tensors (pixel values) cast to `dtype` when given."
    return {k: (v.to(dev, dtype) if dtype is not None and v.is_floating_point() else v.to(dev)) for k, v in batch.items()}


def world_data(n: int, seed: int):
    "Images of `n` counter-prior scenes, the caption prompt, their true captions and other scenes' captions."
    from vlmcourse.world import CAPTION_PROMPT, WorldConfig, caption, render, sample_scenes
    w = WorldConfig()
    scenes = sample_scenes(w, n, seed=seed, kind="counter")
    others = sample_scenes(w, n, seed=seed + 1000, kind="typical")
    return ([render(s, w) for s in scenes], [CAPTION_PROMPT] * n, [caption(s, w) for s in scenes],
            [caption(o, w) for o in others])


# --- (a) the course's LLaVA ------------------------------------------------------------------------------------------

def check_llava(dev):
    from vlmcourse.llava import BaseTrainConfig, fresh_vlm, generate, load_vlm, save_vlm, sft_batch, train_loop
    torch.manual_seed(0)
    model, proc = fresh_vlm(replace(BaseTrainConfig(), clip_init=False))  # no CLIP init: nothing trained, nothing cached
    model.to(dev)
    imgs, qs, caps, _ = world_data(8, seed=1)
    name = "llava generate float32"
    t = time.time()
    out = generate(model, proc, imgs, qs, max_new_tokens=12)
    ok = len(out) == len(imgs) and all(isinstance(o, str) for o in out)
    report(name, ok, f"{len(out)} answers in {time.time() - t:.2f} s, on {next(model.parameters()).device}, "
                     f"e.g. {out[0][:40]!r}")
    name = "llava SFT steps float32"
    batch = to_dev(sft_batch(proc, imgs, qs, caps), dev)
    t = time.time()
    losses = train_loop(model, lambda k: batch, 20, 3e-3, progress=False)
    if dev.type == "cuda": torch.cuda.synchronize()
    ok = finite(losses) and losses[-1] < losses[0]
    report(name, ok, f"20 steps in {time.time() - t:.2f} s, loss {losses[0]:.4f} -> {losses[-1]:.4f} "
                     f"(first 5 {fmt(losses[:5])}), finite={finite(losses)}")
    name = "llava generate bfloat16"
    model.to(torch.bfloat16)
    t = time.time()
    out_bf = generate(model, proc, imgs, qs, max_new_tokens=12)
    with torch.no_grad(): loss_bf = model(**to_dev(batch, dev, torch.bfloat16)).loss.float().item()
    ok = len(out_bf) == len(imgs) and math.isfinite(loss_bf)
    report(name, ok, f"{len(out_bf)} answers in {time.time() - t:.2f} s, bf16 loss {loss_bf:.4f} "
                     f"(float32 after training {losses[-1]:.4f}), e.g. {out_bf[0][:40]!r}")
    name = "llava save_vlm/load_vlm default device"
    t = time.time()
    folder = save_vlm(model, proc, TMP / "llava-ckpt")
    m2, p2 = load_vlm(folder) if dev.type == "cuda" else load_vlm(folder, device="cpu")
    p = next(m2.parameters())
    out2 = generate(m2, p2, imgs, qs, max_new_tokens=12)
    want_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # `load_vlm`'s default dtype on each device
    ok = p.device.type == dev.type and p.dtype == want_dtype and len(out2) == len(imgs)
    same = sum(a == b for a, b in zip(out2, out_bf))
    report(name, ok, f"loaded on {p.device} in {p.dtype} in {time.time() - t:.2f} s; {same}/{len(out2)} answers equal "
                     "to the model's before saving")


# --- (b) DPO log-probabilities: GPU against CPU ------------------------------------------------------------------------

def check_dpo(dev):
    from vlmcourse.llava import LlavaModelConfig, build_processor, build_vlm, sft_batch, train_loop
    from vlmcourse.dpo import DPOTrainConfig, dpo_train, encode_pairs, pair_logps, preference_dataset, sequence_logps
    from vlmcourse.world import WorldConfig
    proc = build_processor(WorldConfig(), LlavaModelConfig())
    ref = build_vlm(proc, LlavaModelConfig(), seed=0).eval()
    imgs, qs, cs, rs = world_data(8, seed=3)
    pairs = preference_dataset(imgs, qs, cs, rs)
    policy = copy.deepcopy(ref)  # five SFT steps on the chosen answers (on the CPU): rewards away from zero
    train_loop(policy, lambda k: sft_batch(proc, imgs, qs, cs), 5, 3e-3, progress=False)
    batch, enc = sft_batch(proc, imgs * 2, qs * 2, cs + rs), encode_pairs(proc, imgs, qs, cs, rs)
    gpu = copy.deepcopy(policy).to(dev)
    tol = 1e-3  # summed log-probabilities of 10-20 tokens, about -30 to -60 here
    with torch.no_grad():
        seq_cpu, (pc_cpu, pr_cpu) = sequence_logps(policy, batch), pair_logps(policy, enc)
        t = time.time()
        seq_gpu = sequence_logps(gpu, to_dev(batch, dev)).cpu()
        pc_gpu, pr_gpu = (x.cpu() for x in pair_logps(gpu, to_dev(enc, dev)))
        if dev.type == "cuda": torch.cuda.synchronize()
        secs = time.time() - t
        seq_bf = sequence_logps(copy.deepcopy(gpu).to(torch.bfloat16), to_dev(batch, dev, torch.bfloat16)).cpu()
    d_seq = (seq_gpu - seq_cpu).abs().max().item()
    d_pair = max((pc_gpu - pc_cpu).abs().max().item(), (pr_gpu - pr_cpu).abs().max().item())
    d_shared = max((pc_gpu - seq_gpu[:8]).abs().max().item(), (pr_gpu - seq_gpu[8:]).abs().max().item())
    report(f"dpo sequence_logps {dev.type} vs cpu float32", d_seq <= tol,
           f"max abs diff {d_seq:.2e} (tol {tol:g}) over {len(seq_cpu)} sequences, logps {seq_cpu.min():.2f}..{seq_cpu.max():.2f}, "
           f"{secs:.2f} s for both scorers on {dev}; bfloat16's max abs diff {(seq_bf - seq_cpu).abs().max().item():.3f} (not checked)")
    report(f"dpo pair_logps {dev.type} vs cpu float32", d_pair <= tol and d_shared <= tol,
           f"max abs diff {d_pair:.2e} against the CPU, {d_shared:.2e} against sequence_logps on {dev} (tol {tol:g})")
    cfg = DPOTrainConfig(batch_size=4, epochs=2)  # 4 steps
    t = time.time()
    h_cpu = dpo_train(copy.deepcopy(policy), proc, pairs, cfg, ref_model=ref, progress=False)
    t_cpu, t = time.time() - t, time.time()
    h_gpu = dpo_train(copy.deepcopy(policy).to(dev), proc, pairs, cfg, ref_model=copy.deepcopy(ref).to(dev), progress=False)
    t_gpu = time.time() - t
    d_loss = max(abs(a - b) for a, b in zip(h_cpu["loss"], h_gpu["loss"]))
    ok = finite(h_gpu["loss"]) and len(h_gpu["loss"]) == len(h_cpu["loss"]) and d_loss <= tol
    report(f"dpo_train {dev.type} vs cpu float32", ok,
           f"{h_gpu['steps']} steps: {dev.type} loss {fmt(h_gpu['loss'])} in {t_gpu:.2f} s, cpu {fmt(h_cpu['loss'])} in {t_cpu:.2f} s, "
           f"max abs diff {d_loss:.2e} (tol {tol:g}), reward accuracy on {dev.type} {fmt(h_gpu['reward_accuracy'])}")
    t = time.time()
    h_bf = dpo_train(copy.deepcopy(policy).to(dev, torch.bfloat16), proc, pairs, cfg,
                     ref_model=copy.deepcopy(ref).to(dev, torch.bfloat16), progress=False)
    report("dpo_train bfloat16", finite(h_bf["loss"]),
           f"{h_bf['steps']} steps in {time.time() - t:.2f} s, loss {fmt(h_bf['loss'])} (float32's {fmt(h_gpu['loss'])})")


# --- (d) the real families' tiny models --------------------------------------------------------------------------------

def check_families(dev):
    import importlib.util
    from vlmcourse.dpo import sequence_logps
    from vlmcourse.llava import generate, sft_batch
    from vlmcourse.real import ARCHS, tiny_vlm
    imgs, qs, caps, _ = world_data(4, seed=5)
    for arch in ARCHS:
        name = f"family {arch} on {dev.type}"
        if arch == "qwen2_vl" and importlib.util.find_spec("torchvision") is None:
            report(name, None, "Qwen2VLProcessor needs torchvision, which is not installed")
            continue
        def one():
            t = time.time()
            model, proc = tiny_vlm(arch, TMP / f"family-{arch}")
            model.to(dev, torch.bfloat16)
            out = generate(model, proc, imgs, qs, max_new_tokens=8)
            report(f"family {arch} generate bfloat16 on {dev.type}", len(out) == len(imgs),
                   f"{len(out)} answers in {time.time() - t:.2f} s (model built and loaded included)")
        def logps():
            model, proc = tiny_vlm(arch, TMP / f"family-{arch}-logps")
            batch = sft_batch(proc, imgs, qs, caps)
            with torch.no_grad():
                lp_cpu = sequence_logps(model, batch)
                model.to(dev)
                lp_gpu = sequence_logps(model, to_dev(batch, dev)).cpu()
            d = (lp_gpu - lp_cpu).abs().max().item()
            report(f"family {arch} sequence_logps {dev.type} vs cpu float32", d <= 1e-3,
                   f"max abs diff {d:.2e} (tol 1e-3), logps {lp_cpu.min():.2f}..{lp_cpu.max():.2f}")
        run_check(f"family {arch} generate bfloat16 on {dev.type}", one)
        run_check(f"family {arch} sequence_logps {dev.type} vs cpu float32", logps)


# --- (c) vlmcourse align -------------------------------------------------------------------------------------------------

LOSS = re.compile(r"""['"](train_loss|loss|rewards/margins|grad_norm)['"]\s*:\s*['"]?([-+0-9.eE]+|nan|inf)""")


def check_align(dev, arch: str, launcher: str, steps: int, log_dir, timeout: float):
    from vlmcourse.llava import generate, load_vlm
    from vlmcourse.real import save_tiny_vlm
    name = f"align {arch} {launcher}"
    folder = TMP / f"align-{arch}-ckpt"
    if not folder.exists(): save_tiny_vlm(arch, folder)
    out = TMP / f"align-{arch}-{launcher}"
    args = ["align", "--model", str(folder), "--pairs", "bpo_inject", "--n-pairs", "8", "--output", str(out),
            "--max-steps", str(steps), "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--lora-r", "4",
            "--arch", arch, "--merge"]
    if launcher == "direct": cmd = [sys.executable, "-m", "vlmcourse.cli"] + args  # the `vlmcourse` command, uninstalled
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate_multi_gpu.yaml"), "--num_processes", "1", "--module", "vlmcourse.cli"] + args
        if dev.type != "cuda": cmd[3:3] = ["--cpu"]
    t = time.time()
    try: r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(TMP))
    except subprocess.TimeoutExpired:
        report(name, False, f"timed out after {time.time() - t:.0f} s")
        return
    secs = time.time() - t
    text = r.stdout + "\n" + r.stderr
    if log_dir: (Path(log_dir) / f"align-{arch}-{launcher}.log").write_text(" ".join(cmd) + "\n\n" + text)
    losses = [float(v) for k, v in LOSS.findall(text) if k == "loss"]
    train_loss = [float(v) for k, v in LOSS.findall(text) if k == "train_loss"]
    margins = [float(v) for k, v in LOSS.findall(text) if k == "rewards/margins"]
    grad_norms = [float(v) for k, v in LOSS.findall(text) if k == "grad_norm"]
    if r.returncode != 0 or not (out / "adapter_config.json").exists():
        print("\n".join(text.strip().splitlines()[-25:]), flush=True)
        report(name, False, f"exit status {r.returncode}, adapter written: {(out / 'adapter_config.json').exists()}, "
                            f"{secs:.1f} s")
        return
    said = [l for l in r.stdout.splitlines() if l.startswith("aligned ")]
    m, p = load_vlm(out / "merged") if dev.type == "cuda" else load_vlm(out / "merged", device="cpu")
    imgs, qs, _, _ = world_data(2, seed=7)
    answers = generate(m, p, imgs, qs, max_new_tokens=8)
    ok = len(losses) >= 1 and finite(losses + train_loss) and len(answers) == 2
    report(name, ok, f"exit 0 in {secs:.1f} s (start-up included), {len(losses)} logged losses {fmt(losses)}, "
                     f"train_loss {fmt(train_loss)}, reward margins {fmt(margins)}, grad norms {fmt(grad_norms)}; merged model loaded on {next(m.parameters()).device} "
                     f"{next(m.parameters()).dtype} and answered; {said[0] if said else 'no summary line'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU: a smoke test of this script")
    ap.add_argument("--only", default="llava,dpo,families,align", help="checks to run, comma-separated")
    ap.add_argument("--align-archs", default="llava,idefics3,qwen2_vl",
                    help="families `vlmcourse align` runs on (LLaVA also under accelerate launch); instructblip fails on "
                         "the CPU too with TRL 1.16 (its fused LM head reads a last_hidden_state InstructBLIP's output lacks)")
    ap.add_argument("--align-steps", type=int, default=3, help="optimiser steps of each align run")
    ap.add_argument("--no-accelerate", action="store_true", help="skip the run under accelerate launch")
    ap.add_argument("--budget", type=float, default=300, help="seconds after which the remaining align runs are skipped")
    ap.add_argument("--log-dir", default=None, help="write each align run's full output there")
    a = ap.parse_args()
    if not a.cpu and not torch.cuda.is_available():
        print("SKIP gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing checked")
        shutil.rmtree(TMP, ignore_errors=True)
        return 0
    dev = torch.device("cpu" if a.cpu else "cuda")
    if a.log_dir: Path(a.log_dir).mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version
    vs = []
    for pkg in ("torch", "transformers", "tokenizers", "trl", "peft", "accelerate", "datasets", "pyarrow", "huggingface_hub"):
        try: vs.append(f"{pkg} {version(pkg)}")
        except Exception: vs.append(f"{pkg} missing")
    gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else "none (--cpu)"
    print(f"gpu_check on {dev}: GPU {gpu}; Python {sys.version.split()[0]}; {', '.join(vs)}; temp {TMP}", flush=True)
    only = set(a.only.split(","))
    t = time.time()
    import vlmcourse.llava, vlmcourse.dpo, vlmcourse.real  # noqa: F401
    print(f"imported vlmcourse.llava, .dpo, .real in {time.time() - t:.1f} s", flush=True)
    if "llava" in only: run_check("llava", check_llava, dev)
    if "dpo" in only: run_check("dpo", check_dpo, dev)
    if "families" in only: run_check("families", check_families, dev)
    if "align" in only:
        runs = [(arch, "direct") for arch in a.align_archs.split(",") if arch]
        if not a.no_accelerate and "llava" in a.align_archs.split(","):
            import importlib.util
            if importlib.util.find_spec("accelerate") is None: report("align llava accelerate", None, "accelerate is not installed")
            else: runs.insert(1, ("llava", "accelerate"))
        for arch, launcher in runs:
            name = f"align {arch} {launcher}"
            if time.time() - T0 > a.budget:
                report(name, None, f"over the time budget ({time.time() - T0:.0f} s > {a.budget:.0f} s)")
                continue
            if arch == "qwen2_vl":
                import importlib.util
                if importlib.util.find_spec("torchvision") is None:
                    report(name, None, "Qwen2VLProcessor needs torchvision, which is not installed")
                    continue
            timeout = min(150, max(30, a.budget + 100 - (time.time() - T0)))  # a hung run cannot eat the rest
            run_check(name, check_align, dev, arch, launcher, a.align_steps, a.log_dir, timeout)
    failed = [n for n, s in RESULTS if s == "FAIL"]
    print(f"gpu_check: {sum(s == 'PASS' for _, s in RESULTS)} passed, {len(failed)} failed, "
          f"{sum(s == 'SKIP' for _, s in RESULTS)} skipped in {time.time() - T0:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    shutil.rmtree(TMP, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
