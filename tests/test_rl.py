"GRPO: the reward by hand, the loss against loops written apart from the notebook's, degenerate cases, bad input, and the first step of TRL's GRPOTrainer on a tiny LLaVA."
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json, math, tempfile

import pytest
import torch

from vlmcourse.llava import BaseTrainConfig, build_processor, build_vlm, save_vlm, load_vlm
from vlmcourse.rl import (GRPOTrainConfig, RewardConfig, completion_logps, group_advantages, grpo_loss, grpo_prompts,
                          hallucination_reward, presence_shape, rl_vlm_path, trl_grpo_config, trl_reward)
from vlmcourse.world import CAPTION_PROMPT, Scene, ShapeObject, WorldConfig, caption

WCFG = WorldConfig()
SCENE = Scene((ShapeObject("circle", "blue", 0, 0.8), ShapeObject("triangle", "red", 3, 0.8)), "counter")


def test_reward_by_hand():
    answers = [caption(SCENE, WCFG), "a circle and a square .", "a triangle .", "squares and a square and a ring .", "nothing to see"]
    assert hallucination_reward(answers, [SCENE] * 5, WCFG) == [1.0, -0.5, 0.5, -2.0, 0.0]
    assert hallucination_reward(answers, [SCENE] * 5, WCFG, reward_cfg=RewardConfig(invented=3.0, named=0.0)) == [0.0, -3.0, 0.0, -6.0, 0.0]
    qs = ["is there a triangle in the image ?", "is there a diamond in the image ?", "is there a diamond in the image ?", "Is there an ring in the image ?"]
    assert hallucination_reward(["yes .", "yes .", "no , there is not .", "no ."], [SCENE] * 4, WCFG, qs) == [1.0, 0.0, 1.0, 1.0]
    assert presence_shape("describe the image .") is None and presence_shape("is there a cross in the image ?") == "cross"


def test_reward_bad_input():
    with pytest.raises(ValueError, match="one scene and one question"): hallucination_reward(["a"], [SCENE, SCENE], WCFG)
    with pytest.raises(TypeError, match="Scene.from_dict"): hallucination_reward(["a"], [{"objects": []}], WCFG)
    with pytest.raises(ValueError, match="weight >= 0"): RewardConfig(named=float("nan"))


def loops_loss(lp, old, ref, adv, mask, beta, eps, loss_type, kl_ratio=False):
    "The negative of DeepSeekMath's eq. 3 with eq. 4, token by token."
    per_seq, tokens, total = [], 0, 0.0
    for i in range(len(adv)):
        s = []
        for t in range(len(mask[i])):
            if not mask[i][t]: continue
            rho = math.exp(lp[i][t] - old[i][t])
            kl = math.exp(ref[i][t] - lp[i][t]) - (ref[i][t] - lp[i][t]) - 1
            s.append(-min(rho * adv[i], max(min(rho, 1 + eps), 1 - eps) * adv[i]) + beta * kl * (rho if kl_ratio else 1.0))
        per_seq.append(sum(s) / len(s)); total += sum(s); tokens += len(s)
    return sum(per_seq) / len(per_seq) if loss_type == "grpo" else total / tokens


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("beta,eps", [(0.04, 0.2), (0.0, 0.05), (1.0, 0.5)])
@pytest.mark.parametrize("kl_ratio", [False, True])
def test_loss_against_loops(loss_type, beta, eps, kl_ratio):
    g = torch.Generator().manual_seed(3)
    N, C, G = 8, 5, 4
    lp, old, ref = (-3 * torch.rand(N, C, generator=g) for _ in range(3))
    mask = (torch.arange(C)[None] < torch.randint(1, C + 1, (N,), generator=g)[:, None]).long()
    r = [1.0, 0.0, 2.0, 0.5, 3.0, 3.0, 1.0, -1.0]
    adv = group_advantages(r, G)
    for k in range(0, N, G):  # eq. 2 by hand
        grp = r[k:k + G]; m = sum(grp) / G; sd = math.sqrt(sum((x - m) ** 2 for x in grp) / (G - 1))
        assert torch.allclose(adv[k:k + G], torch.tensor([(x - m) / (sd + 1e-4) for x in grp]), atol=1e-6)
    got = grpo_loss(lp, old, ref, adv, mask, beta, eps, loss_type, kl_ratio).item()
    want = loops_loss(lp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), beta, eps, loss_type, kl_ratio)
    assert abs(got - want) < 1e-5


def test_loss_degenerate_and_bad_input():
    lp = (-torch.rand(4, 3)).requires_grad_()
    loss = grpo_loss(lp, lp.detach(), lp.detach(), group_advantages([2.0] * 4, 4), torch.ones(4, 3))
    loss.backward()
    assert loss.item() == 0.0 and lp.grad.abs().max().item() == 0.0  # a group that agrees teaches nothing
    with pytest.raises(ValueError, match="groups of 3"): group_advantages([1.0] * 4, 3)
    with pytest.raises(ValueError, match="no tokens"): grpo_loss(lp, lp, lp, torch.zeros(4), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="unknown loss_type"): GRPOTrainConfig(loss_type="bnpo")
    with pytest.raises(ValueError, match="wall-clock budget"): rl_vlm_path(GRPOTrainConfig(seconds=5.0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "A randomly initialised tiny LLaVA, saved so that TRL can build its reference from the folder."
    torch.manual_seed(0)
    proc = build_processor(WCFG)
    folder = save_vlm(build_vlm(proc), proc, tmp_path_factory.mktemp("tiny") / "llava")
    return folder


@pytest.mark.parametrize("kl_ratio", [True, False])
def test_first_step_equals_trl(tiny, kl_ratio):
    from trl import GRPOTrainer
    G, P, T = 4, 2, 2.0  # a random model at temperature 2 writes varied answers, so that the advantages are not all 0
    policy, proc = load_vlm(tiny, device="cpu")
    ref, _ = load_vlm(tiny, device="cpu")
    with torch.no_grad():  # a reference unlike the policy, so that the KL term and its gradient are not zero
        for p in ref.parameters(): p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    ds = grpo_prompts(WCFG, P, seed=1)
    gcfg = GRPOTrainConfig(num_generations=G, prompts_per_step=P, temperature=T, max_completion_length=8, max_steps=1, kl_ratio=kl_ratio)
    tr = GRPOTrainer(model=policy, reward_funcs=trl_reward(WCFG), args=trl_grpo_config(gcfg, tempfile.mkdtemp()), train_dataset=ds, processing_class=proc)
    from trl.trainer.utils import add_fused_lm_head
    add_fused_lm_head(ref, temperature=T); tr.ref_model = ref
    rows = [ds[i] for i in range(P) for _ in range(G)]
    tr.model.train(); tr.current_gradient_accumulation_steps = 1
    torch.manual_seed(0)
    batch = tr._generate_and_score_completions(rows)
    loss = tr.compute_loss(tr.model, batch); loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad()
    cid, cm = batch["completion_ids"], batch["completion_mask"]
    texts = proc.tokenizer.batch_decode(cid, skip_special_tokens=True)
    qs = [r["prompt"][0]["content"][1]["text"] for r in rows]
    adv = group_advantages(hallucination_reward(texts, [Scene.from_dict(json.loads(r["scene"])) for r in rows], WCFG, qs), G)
    assert torch.allclose(adv, batch["advantages"], atol=1e-5)
    imgs = [r["images"][0] for r in rows]
    lp = completion_logps(policy, proc, imgs, qs, cid, cm, T)
    with torch.no_grad(): ref_lp = completion_logps(ref, proc, imgs, qs, cid, cm, T)
    assert torch.allclose(ref_lp[cm.bool()], batch["ref_per_token_logps"][cm.bool()], atol=1e-5)
    ours = grpo_loss(lp, lp.detach(), ref_lp, adv, cm, gcfg.beta, gcfg.epsilon, kl_ratio=kl_ratio)
    ours.backward()
    assert abs(ours.item() - loss.item()) < 1e-5
    assert max((p.grad - trl_grads[n]).abs().max().item() for n, p in policy.named_parameters() if n in trl_grads) < 1e-5
    assert max(g.abs().max().item() for g in trl_grads.values()) > 1e-4  # the gradients compared are not all zero


def test_the_grpo_model_is_registered():
    from vlmcourse.registry import models
    e = models()["grpo"]
    assert e.lesson == "12_rl" and e.path_fn == "vlmcourse.rl:rl_vlm_path"
