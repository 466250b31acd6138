"Each lesson's exercise solutions pass the lesson's check, and a wrong or unattempted answer does not."
import torch

import solutions as S
from vlmcourse.clip import VisionTowerConfig, clip_loss, retrieval_recall
from vlmcourse.exercises import check
from vlmcourse.hallucination import chair, pope_metrics
from vlmcourse.llava import LlavaModelConfig, pack_examples
from vlmcourse.world import Scene, ShapeObject, WorldConfig, caption, cooccurrence, sample_scenes

CFG = WorldConfig()


def test_check_tells_right_wrong_and_unattempted(capsys):
    def todo(x): raise NotImplementedError
    assert not check(todo, [(1,)], [1]) and "not attempted" in capsys.readouterr().out
    assert not check(lambda x: x + 1, [(1,)], [1]) and "case 1 of 1" in capsys.readouterr().out
    assert check(lambda x: x, [(1,), (2.0,)], lambda x: x) and "right" in capsys.readouterr().out


def test_world_exercises():
    scenes = sample_scenes(CFG, 400, seed=5)
    M = cooccurrence(scenes, CFG)
    cases = [(scenes, "circle", "square"), (scenes, "triangle", "ring")]
    assert check(S.partner_rate, cases, lambda scs, a, b: float(M[CFG.shapes.index(a), CFG.shapes.index(b)]))
    def one(*shapes): return Scene(tuple(ShapeObject(s, "red", k, 0.7) for k, s in enumerate(shapes)))
    assert check(S.missing_partners_of, [(one("circle"), CFG), (one("circle", "square"), CFG), (one("triangle"), CFG)], [["square"], [], ["diamond"]])
    assert not check(lambda s, c: [], [(one("circle"), CFG)], [["square"]])


def test_clip_exercises():
    g = torch.Generator().manual_seed(0)
    sims = [torch.randn(8, 8, generator=g) + k * torch.eye(8) for k in (0.0, 3.0)]
    assert check(S.recall_at_1, [(s,) for s in sims], lambda s: retrieval_recall(s, ks=(1,))["i2t@1"])
    us = [torch.randn(6, 4, generator=g) for _ in range(2)]
    assert check(lambda u, v, t: float(S.image_to_text_loss(u, v, t)), [(u, u, torch.tensor(2.0)) for u in us],
                 lambda u, v, t: float(clip_loss(u, v, t)), tol=1e-5)


def test_llava_exercises():
    assert check(S.image_tokens, [(32, 8, True), (336, 14, False)],
                 lambda s, p, cls: LlavaModelConfig(vision=VisionTowerConfig(image_size=s, patch_size=p),
                                                    vision_feature_select="full" if cls else "default").num_image_tokens)
    def flags(p, a, w):
        return (pack_examples([([7] * p, [8] * a), ([7] * (w - a), [8] * a)], pad_id=0)["labels"][0] != -100).int().tolist()
    assert check(S.scored, [(3, 2, 6), (1, 4, 9)], flags)


def test_hallucination_exercises():
    scenes = sample_scenes(CFG, 30, seed=1)
    caps, truths = [caption(s, CFG) for s in scenes], [s.shapes for s in scenes]
    wrong = truths[1:] + truths[:1]
    assert check(S.chair_s, [(caps, truths), (caps, wrong)], lambda c, t: chair(c, t, CFG.shapes)["chair_s"])
    labels = ["yes", "no", "no", "yes"]
    replies = [["yes .", "no .", "yes .", "yes ."], ["Yes, there is.", "No!", "not at all", "yes"]]
    assert check(S.pope_acc_yes, [(r, labels) for r in replies], lambda r, l: (pope_metrics(r, l)["accuracy"], pope_metrics(r, l)["yes_ratio"]))


def test_dpo_exercises():
    from vlmcourse.dpo import dpo_loss
    def ipo(pc, pr, rc, rr, tau, lc, lr):
        t = lambda x: torch.tensor([float(x)])
        return dpo_loss(t(pc), t(pr), t(rc), t(rr), tau, "ipo", chosen_lengths=t(lc), rejected_lengths=t(lr))[0].item()
    assert check(S.ipo_one, [(-12.0, -30.0, -12.0, -30.0, 0.1, 10, 12), (-3.0, -2.0, -4.0, -1.0, 1.0, 3, 3)], ipo, tol=1e-5)
    assert check(S.margin_for_weight, [(0.5,), (0.05,)], lambda w: torch.logit(torch.tensor(1 - w, dtype=torch.float64)).item())


def test_pairs_exercises():
    from vlmcourse.pairs import contrastive_logits, noise_schedule
    assert check(S.signal_left, [(0,), (500,), (999,)], lambda t: noise_schedule()[1][t].sqrt().item(), tol=1e-6)
    ls, lcs = [[2.0, 1.9, -1.0, 0.5], [1.0, 1.0, 1.0, 1.0]], [[3.0, 0.0, -3.0, 0.0], [0.0, 2.0, 0.5, 1.0]]
    assert check(S.vcd_pick, [(l, lc, a, c) for l, lc in zip(ls, lcs) for a, c in ((1.0, 0.2), (2.0, 0.9))],
                 lambda l, lc, a, c: int(contrastive_logits(torch.tensor([l]), torch.tensor([lc]), a, c).argmax()))


def test_cal_exercises():
    from vlmcourse.cal import cal_weights
    def exported(d, low, high):
        z = torch.tensor(d, dtype=torch.float32)[None, :, None]
        return cal_weights(z, torch.zeros_like(z), torch.zeros(1, len(d), dtype=torch.long), low, high).squeeze(0).tolist()
    assert check(S.answer_weights, [([0.5, 3.0, 9.0], 1.0, 5.0), ([2.0], 1.0, 5.0), ([6.0, -1.0, 2.0, 4.0, 0.0], 1.0, 3.0)], exported, tol=1e-5)
    assert check(S.weighted_mean, [([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]), ([0.5, 4.0], [1.0, 3.0])], [2.0, 3.125])


def test_plora_exercises():
    from torch import nn
    from vlmcourse.plora import PLoRALinear
    assert check(S.adapter_params, [(6, 5, 2), (64, 192, 8)],
                 lambda i, o, r: sum(p.numel() for n, p in PLoRALinear(nn.Linear(i, o), r=r, alpha=r, dropout=0.0).named_parameters() if "lora" in n))
    assert check(S.image_positions, [([[5, 3, 3, 7], [3, 1]], 3)], lambda ids, i: [[t == i for t in row] for row in ids])


def test_preference_exercises():
    from vlmcourse.preference import welch
    assert check(S.gap_closed, [(0.515, 0.515, 0.0), (0.1, 0.5, 0.0), (0.75, 0.5, 1.0)], [0.0, 0.8, 0.5])
    assert check(S.welch_t, [([0.6, 0.65, 0.7], [0.5, 0.45, 0.46]), ([0.1, 0.3], [0.2, 0.2, 0.5])], lambda x, y: float(welch(x, y)[0]))


def test_demo_exercises():
    from vlmcourse.demo import check_seed, presence_object
    prompts = ["is there a circle in the image ?", "describe the image .", "are there two squares ?", "is there a circle or a square ?",
               "can you see a ring ?", "what colour is the diamond ?", "is there anything red ?"]
    assert check(S.asked_object, [(p,) for p in prompts], lambda p: presence_object(p))
    def accepted(x):
        try: check_seed(x)
        except (ValueError, TypeError): return False
        return True
    assert check(S.valid_seed, [(0,), (2**32 - 1,), (2**32,), (-1,), (3.5,), (4.0,), (10**30,), (True,), ("5",)], accepted)


def test_real_models_exercises():
    from vlmcourse.hallucination import pope_answer
    from vlmcourse.world import plural
    replies = ["No, there is not.", "Yes.", "Not at all", "No!", "no-one is there", "There is a no entry sign. Yes.", "yes, a circle", "nope"]
    assert check(S.pope_strict, [(r,) for r in replies], lambda r: pope_answer(r, strict=True))
    assert check(S.plural_of, [(w,) for w in ("circle", "cross", "box", "bench")], lambda w: plural(w))


def test_pixelllm_exercises():
    from vlmcourse.pixelllm import cell_of, point_loss
    def exported(p, t, m): return point_loss(torch.tensor([p]), torch.tensor([t]), torch.tensor([m])).item()
    assert check(S.mean_point_error, [([(0.1, 0.2), (0.5, 0.5), (0.9, 0.9)], [(0.2, 0.4), (0.0, 0.0), (1.0, 1.0)], [True, False, True]),
                                      ([(0.0, 1.0), (1.0, 0.0)], [(1.0, 1.0), (1.0, 1.0)], [True, True])], exported, tol=1e-6)
    assert check(S.cell_index, [(0, 0, 32, 2), (16, 3, 32, 2), (31.9, 31.9, 32, 2), (40, -2, 32, 2), (20, 20, 30, 3)],
                 lambda x, y, s, g: cell_of(x, y, WorldConfig(image_size=s, grid=g, max_objects=min(3, g * g))))


def test_rl_exercises():
    from vlmcourse.rl import RewardConfig, group_advantages, hallucination_reward
    from vlmcourse.world import Scene, ShapeObject, WorldConfig
    def exported(named, truth, w_named, w_invented):
        sc = Scene(tuple(ShapeObject(s, "red", k, 0.8) for k, s in enumerate(truth)))
        return hallucination_reward([" and ".join(f"a {w}" for w in named) + " ."], [sc], WorldConfig(), reward_cfg=RewardConfig(w_invented, w_named))[0]
    assert check(S.caption_reward, [(["circle", "square"], ["circle"], 0.5, 1.0), (["circle", "circle", "ring"], ["circle", "ring", "cross"], 0.5, 1.0),
                                    ([], ["circle"], 0.5, 1.0), (["square", "square", "diamond"], ["circle"], 0.0, 2.0)], exported)
    assert check(S.group_advantage, [([1.0, 0.0, 0.0, 1.0],), ([0.5, 0.5, 0.5],), ([-2.0, 1.0, 1.5, 0.0, 1.0, 1.0, -1.0, 0.5],)],
                 lambda r: group_advantages(r, len(r)).tolist(), tol=1e-5)


def test_lavit_exercises():
    from transformers import CLIPVisionModel
    from vlmcourse.clip import vision_config
    from vlmcourse.lavit import DynamicVisualTokenizer, LavitProcessor, VisualTokenizerConfig, add_code_tokens, codebook_usage
    from vlmcourse.world import build_tokenizer
    assert check(S.perplexity_of, [([0, 1, 2, 3], 4), ([5, 5, 5], 8), ([0, 0, 1, -1, 2, -1], 3)],
                 lambda ids, K: codebook_usage(torch.tensor(ids), K)["perplexity"])
    cfg = VisualTokenizerConfig(codebook_size=16)
    tok = build_tokenizer(WorldConfig())
    add_code_tokens(tok, 16)
    proc = LavitProcessor(CLIPVisionModel(vision_config(cfg.clip.vision)), DynamicVisualTokenizer(cfg), tok)
    def seq_len(keep, n_text):
        pre, vis, _ = proc.prompt_ids("q", [0] * int(sum(keep)))
        return len(pre) - 2 + len(vis) + n_text  # 'user :' belongs to the text
    assert check(S.sequence_length, [([1, 0, 1, 1], 10), ([0] * 15 + [1], 3), ([1] * 16, 0)], seq_len)
