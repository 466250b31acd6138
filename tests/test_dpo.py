"DPO: hand-computed losses, bad input, the pairs format, and numerical parity with TRL's DPOTrainer on a tiny LLaVA."
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import math
import re
import tempfile

import pytest
import torch
from transformers.trainer_callback import PrinterCallback

from vlmcourse.dpo import (DPOTrainConfig, unpack_pairs, answer_lengths, dpo_loss, dpo_train, for_trl,
                           preference_dataset, sequence_logps, trl_dpo_config)
from vlmcourse.llava import LlavaModelConfig, build_processor, build_vlm, sft_batch, train_loop
from vlmcourse.world import CAPTION_PROMPT, WorldConfig, caption, render, sample_scenes

WCFG = WorldConfig()


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# --- the loss -------------------------------------------------------------------------------------------------

def test_sigmoid_hand_computed():
    # policy moved 5 nats towards the chosen answer: r_c = 0.1 * 5 = 0.5, r_r = 0
    losses, rc, rr = dpo_loss(t(-7.0), t(-30.0), t(-12.0), t(-30.0), beta=0.1)
    assert rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(0.0)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.5)))


def test_variants_hand_computed():
    args = (t(-7.0, -2.0), t(-30.0, -30.0), t(-12.0, -12.0), t(-30.0, -30.0))  # margins h = 0.5 and 1.0
    assert dpo_loss(*args, loss_type="hinge")[0].tolist() == pytest.approx([0.5, 0.0])
    eps, h = 0.1, 0.5
    robust = (-(1 - eps) * math.log(1 / (1 + math.exp(-h))) + eps * math.log(1 / (1 + math.exp(h)))) / (1 - 2 * eps)
    assert dpo_loss(*args, loss_type="robust", label_smoothing=eps)[0][0].item() == pytest.approx(robust)
    # IPO on sequence log-ratios (5 and 0), then per token (5 chosen tokens: 1.0): (x - 1 / (2 beta))^2 with beta 0.1
    assert dpo_loss(*args, loss_type="ipo")[0][0].item() == pytest.approx((5 - 5) ** 2)
    assert dpo_loss(*args, loss_type="ipo", chosen_lengths=torch.tensor([5, 5]), rejected_lengths=torch.tensor([3, 3]))[0][0].item() == pytest.approx((1 - 5) ** 2)


@pytest.mark.parametrize("loss_type, at_ref", [("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", 25.0), ("robust", math.log(2))])
def test_policy_equal_to_reference(loss_type, at_ref):
    x, y = t(-3.0, -40.0, -12.5), t(-9.0, -1.0, -12.5)
    losses, rc, rr = dpo_loss(x, y, x, y, loss_type=loss_type)
    assert losses.tolist() == pytest.approx([at_ref] * 3)
    assert rc.abs().max() == 0 and rr.abs().max() == 0


def test_robust_with_no_smoothing_is_dpo():
    g = torch.Generator().manual_seed(0)
    a = [-20 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4)]
    torch.testing.assert_close(dpo_loss(*a, loss_type="robust")[0], dpo_loss(*a)[0])


def test_gradient_weight():
    "d loss / d log pi(y_c|x) = -beta * sigmoid(r_r - r_c), the derivation's per-pair weight."
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-20 * torch.rand(5, generator=g, dtype=torch.float64) for _ in range(4))
    pc.requires_grad_(); pr.requires_grad_()
    losses, cr, rjr = dpo_loss(pc, pr, rc, rr, beta=0.25)
    losses.sum().backward()
    w = torch.sigmoid(rjr - cr)
    torch.testing.assert_close(pc.grad, -0.25 * w)
    torch.testing.assert_close(pr.grad, 0.25 * w)
    assert not cr.requires_grad  # rewards are detached, as TRL logs them


@pytest.mark.parametrize("kwargs, message", [
    (dict(ref_rejected_logps=t(1.0, 2.0)), "shape [B]"),
    (dict(loss_type="dpo"), "unknown loss_type"),
    (dict(label_smoothing=0.1), "loss_type='robust'"),
    (dict(loss_type="robust", label_smoothing=0.5), "[0, 0.5)"),
    (dict(beta=0.0), "beta must be positive"),
    (dict(chosen_lengths=torch.tensor([3])), "both chosen_lengths and rejected_lengths"),
])
def test_loss_bad_input(kwargs, message):
    args = dict(policy_chosen_logps=t(-1.0), policy_rejected_logps=t(-2.0), ref_chosen_logps=t(-1.0), ref_rejected_logps=t(-2.0))
    args.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        dpo_loss(**args)


def test_loss_rejects_non_tensors():
    with pytest.raises(TypeError, match="torch.Tensor"):
        dpo_loss([-1.0], t(-2.0), t(-1.0), t(-2.0))
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(t(-1.0)[None], t(-2.0)[None], t(-1.0)[None], t(-2.0)[None])


# --- pairs and log-probabilities --------------------------------------------------------------------------------

def make_pairs(n, seed, source=None):
    "Counter-prior scenes; chosen = the true caption, rejected = another scene's caption."
    scenes = sample_scenes(WCFG, n, seed=seed, kind="counter")
    others = sample_scenes(WCFG, n, seed=seed + 1000, kind="typical")
    return preference_dataset([render(s, WCFG) for s in scenes], [CAPTION_PROMPT] * n, [caption(s, WCFG) for s in scenes],
                              [caption(o, WCFG) for o in others], source=source)


@pytest.fixture(scope="module")
def proc():
    return build_processor(WCFG, LlavaModelConfig())


@pytest.fixture(scope="module")
def ref(proc):
    return build_vlm(proc, LlavaModelConfig(), seed=0).eval()


@pytest.fixture(scope="module")
def pairs():
    return make_pairs(8, seed=3)


@pytest.fixture(scope="module")
def policy(ref, proc, pairs):
    "The reference after five supervised steps on the chosen answers: rewards far from zero."
    imgs, qs, cs, _ = unpack_pairs(pairs)
    p = copy.deepcopy(ref)
    train_loop(p, lambda k: sft_batch(proc, imgs, qs, cs), 5, 3e-3, progress=False)
    return p


def test_preference_dataset_format(pairs):
    assert set(pairs.column_names) == {"images", "prompt", "chosen", "rejected"}
    ex = pairs[0]
    assert len(ex["images"]) == 1 and ex["images"][0].size == (WCFG.image_size, WCFG.image_size)
    assert ex["prompt"][0]["role"] == "user" and [p["type"] for p in ex["prompt"][0]["content"]] == ["image", "text"]
    assert ex["prompt"][0]["content"][1]["text"] == CAPTION_PROMPT
    assert ex["chosen"][0]["role"] == "assistant" and ex["rejected"][0]["role"] == "assistant"
    imgs, qs, cs, rs = unpack_pairs(pairs)
    assert cs[0] == caption(sample_scenes(WCFG, 8, seed=3, kind="counter")[0], WCFG) and len(rs) == 8


def test_preference_dataset_source():
    assert make_pairs(2, seed=0, source="error injection")["source"] == ["error injection"] * 2
    assert make_pairs(2, seed=0, source=["a", "b"])["source"] == ["a", "b"]
    with pytest.raises(ValueError, match="2 sources for 3 pairs"):
        make_pairs(3, seed=0, source=["a", "b"])


def test_preference_dataset_bad_input():
    img = render(sample_scenes(WCFG, 1)[0], WCFG)
    with pytest.raises(ValueError, match="one of each per pair"):
        preference_dataset([img], ["q"], ["a", "b"], ["c"])
    with pytest.raises(TypeError, match="list of strings"):
        preference_dataset([img], "q", ["a"], ["c"])
    with pytest.raises(ValueError, match="non-empty string"):
        preference_dataset([img], ["q"], ["a"], [" "])
    with pytest.raises(TypeError, match="list of PIL images"):
        preference_dataset(img, ["q"], ["a"], ["c"])


def test_sequence_logps_is_the_models_loss(ref, proc, pairs):
    imgs, qs, cs, _ = unpack_pairs(pairs)
    b = sft_batch(proc, imgs, qs, cs)
    with torch.no_grad():
        lp, own = sequence_logps(ref, b), ref(**b).loss
    assert lp.shape == (8,) and (lp < 0).all()
    assert (-lp.sum() / answer_lengths(b).sum()).item() == pytest.approx(own.item(), abs=1e-5)
    # one example alone gives the same number as in the padded batch
    b1 = sft_batch(proc, imgs[:1], qs[:1], cs[:1])
    with torch.no_grad():
        assert sequence_logps(ref, b1).item() == pytest.approx(lp[0].item(), abs=1e-4)
    with pytest.raises(ValueError, match="no `labels`"):
        sequence_logps(ref, {k: v for k, v in b.items() if k != "labels"})


def test_trl_collator_scores_the_same_tokens(proc, pairs):
    "The course's template closes assistant turns with </s>: TRL's collator scores sft_batch's tokens with nothing patched."
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
    assert for_trl(pairs, proc) is pairs
    imgs, qs, cs, rs = unpack_pairs(pairs)
    ours = sft_batch(proc, imgs * 2, qs * 2, cs + rs)
    T = ours["input_ids"].shape[1]
    theirs = DataCollatorForVisionPreference(processor=proc)([dict(r) for r in pairs])
    assert torch.equal(theirs["input_ids"][:, :T] * theirs["attention_mask"][:, :T], ours["input_ids"] * ours["attention_mask"])
    assert torch.equal(theirs["completion_mask"][:, :T].bool(), ours["labels"] != -100)
    assert theirs["attention_mask"][:, T:].sum() == 0


def test_for_trl_closes_answers_for_a_template_that_does_not(proc, pairs):
    "A template that ends no turn (LLaVA-1.5's): for_trl appends </s> to each answer, as sft_batch does, so TRL scores the same tokens."
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
    opening = copy.deepcopy(proc)
    closing_part = "{% if m['role'] == 'assistant' %} </s>{% endif %}"
    assert closing_part in opening.chat_template
    opening.chat_template = opening.chat_template.replace(closing_part, "")
    patched = for_trl(pairs, opening)
    assert patched is not pairs
    imgs, qs, cs, rs = unpack_pairs(pairs)
    ours = sft_batch(opening, imgs * 2, qs * 2, cs + rs)
    T = ours["input_ids"].shape[1]
    theirs = DataCollatorForVisionPreference(processor=opening)([dict(r) for r in patched])
    assert torch.equal(theirs["completion_mask"][:, :T].bool(), ours["labels"] != -100)
    raw = DataCollatorForVisionPreference(processor=opening)([dict(r) for r in pairs])
    assert (raw["completion_mask"].sum(1) == theirs["completion_mask"].sum(1) - 1).all()  # unpatched, TRL would miss the last token


# --- parity with TRL's DPOTrainer -------------------------------------------------------------------------------

def trl_first_step(policy, ref, pairs, proc, cfg):
    "Loss and mean rewards of TRL's DPOTrainer at its first step, with every pair in the one batch."
    from trl import DPOTrainer
    with tempfile.TemporaryDirectory() as d:
        tr = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), train_dataset=for_trl(pairs, proc), processing_class=proc,
                        args=trl_dpo_config(cfg, d, max_steps=1, per_device_train_batch_size=len(pairs)))
        tr.remove_callback(PrinterCallback)
        tr.train()
    h = tr.state.log_history[0]
    return h["loss"], h["rewards/chosen"], h["rewards/rejected"]


@pytest.mark.parametrize("cfg", [DPOTrainConfig(), DPOTrainConfig(beta=0.5), DPOTrainConfig(loss_type="hinge"), DPOTrainConfig(loss_type="ipo"),
                                 DPOTrainConfig(loss_type="robust", label_smoothing=0.2), DPOTrainConfig(sft_weight=0.5)],
                         ids=["sigmoid", "sigmoid-beta0.5", "hinge", "ipo", "robust", "sigmoid+sft"])
def test_parity_with_trl(policy, ref, proc, pairs, cfg):
    imgs, qs, cs, rs = unpack_pairs(pairs)
    b = sft_batch(proc, imgs * 2, qs * 2, cs + rs)
    with torch.no_grad():
        (pc, pr), (rc, rr) = sequence_logps(policy, b).chunk(2), sequence_logps(ref, b).chunk(2)
    lc, lr = answer_lengths(b).chunk(2)
    losses, cr, rjr = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.loss_type, cfg.label_smoothing, lc, lr)
    ours = losses.mean().item() + cfg.sft_weight * (-pc.sum() / lc.sum()).item()
    trl_loss, trl_rc, trl_rr = trl_first_step(policy, ref, pairs, proc, cfg)
    assert ours == pytest.approx(trl_loss, abs=1e-5)
    assert cr.mean().item() == pytest.approx(trl_rc, abs=1e-5) and rjr.mean().item() == pytest.approx(trl_rr, abs=1e-5)
    assert abs(cr.mean().item()) > 0.1  # the policy is not the reference: no trivial agreement
    if cfg.loss_type == "sigmoid":
        assert abs(losses.mean().item() - math.log(2)) > 0.05


def test_dpo_train_first_step_is_trls(policy, ref, proc, pairs):
    cfg = DPOTrainConfig(batch_size=8, epochs=1)
    h = dpo_train(copy.deepcopy(policy), proc, pairs, cfg, ref_model=ref, progress=False)
    assert h["loss"][0] == pytest.approx(trl_first_step(policy, ref, pairs, proc, cfg)[0], abs=1e-5)
    assert abs(h["loss"][0] - math.log(2)) > 0.05


# --- the training loop ----------------------------------------------------------------------------------------

def test_dpo_train_default_reference_is_the_initial_state(policy, proc, pairs):
    cfg = DPOTrainConfig(batch_size=4, epochs=2, lr=1e-3)
    h_none = dpo_train(copy.deepcopy(policy), proc, pairs, cfg, progress=False)
    h_copy = dpo_train(copy.deepcopy(policy), proc, pairs, cfg, ref_model=copy.deepcopy(policy), progress=False)
    assert h_none["steps"] == 4 and len(h_none["loss"]) == len(h_none["margin"]) == len(h_none["reward_accuracy"]) == 4
    assert h_none["loss"][0] == pytest.approx(math.log(2), abs=1e-6) and h_none["reward_accuracy"][0] == 0.0
    for k in ("loss", "margin", "chosen_reward", "rejected_reward"):
        assert h_none[k] == pytest.approx(h_copy[k], abs=1e-4), k


def test_dpo_train_separates_the_training_pairs(ref, proc):
    pairs = make_pairs(32, seed=5)
    model = copy.deepcopy(ref)
    h = dpo_train(model, proc, pairs, DPOTrainConfig(batch_size=8, epochs=4, lr=2e-3), progress=False)
    assert h["steps"] == 16
    assert h["margin"][0] == 0.0 and h["reward_accuracy"][0] == 0.0
    assert sum(h["margin"][-4:]) / 4 > 0.3 and sum(h["reward_accuracy"][-4:]) / 4 > 0.7
    assert sum(h["loss"][-4:]) / 4 < math.log(2) - 0.1
    # the model changed and the reference (the initial state) did not
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def test_dpo_train_sft_term_is_recorded(ref, proc, pairs):
    h = dpo_train(copy.deepcopy(ref), proc, pairs, DPOTrainConfig(batch_size=8, epochs=1, sft_weight=2.0), progress=False)
    assert h["loss"][0] == pytest.approx(h["dpo_loss"][0] + 2.0 * h["sft_loss"][0], abs=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="kto"), "unknown loss_type"), (dict(beta=-1.0), "beta must be positive"), (dict(epochs=0), "at least 1"),
    (dict(label_smoothing=0.1), "'robust' only"), (dict(warmup=1.0), "warmup"), (dict(sft_weight=-1.0), "sft_weight"), (dict(lr=0.0), "lr must be positive"),
])
def test_config_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPOTrainConfig(**kwargs)


def test_dpo_train_bad_pairs(ref, proc, pairs):
    with pytest.raises(ValueError, match="columns"):
        dpo_train(ref, proc, pairs.remove_columns("rejected"), progress=False)
    two = pairs.select(range(2)).map(lambda ex: {"images": ex["images"] * 2})
    with pytest.raises(ValueError, match="exactly one image"):
        dpo_train(ref, proc, two, progress=False)
    with pytest.raises(TypeError, match="DPOTrainConfig"):
        dpo_train(ref, proc, pairs, dpo_cfg={"beta": 0.1}, progress=False)



def test_pair_logps_is_sequence_logps_with_mixed_prompt_lengths(policy, proc):
    "One prefix, two answers: the same log-probabilities as scoring whole sequences, prompts of different lengths in one batch."
    from vlmcourse.dpo import encode_pairs, pair_logps
    scenes = sample_scenes(WCFG, 6, seed=9, kind="counter")
    imgs = [render(s, WCFG) for s in scenes]
    qs = [CAPTION_PROMPT, "is there a circle in the image ?", CAPTION_PROMPT, "what colour is the square ?", CAPTION_PROMPT, "is there a ring in the image ?"]
    cs = [caption(s, WCFG) for s in scenes]
    rs = ["no ."] * 6
    with torch.no_grad():
        c, r = pair_logps(policy, encode_pairs(proc, imgs, qs, cs, rs))
        c0, r0 = sequence_logps(policy, sft_batch(proc, imgs * 2, qs * 2, cs + rs)).chunk(2)
    torch.testing.assert_close(c, c0, atol=1e-4, rtol=0)
    torch.testing.assert_close(r, r0, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="one image, question"):
        encode_pairs(proc, imgs[:2], qs, cs, rs)


def test_dpo_train_is_the_same_with_and_without_the_shared_prefix(policy, ref, proc, pairs, monkeypatch):
    import vlmcourse.dpo as dpo
    cfg = DPOTrainConfig(batch_size=4, epochs=1)
    shared = dpo_train(copy.deepcopy(policy), proc, pairs, cfg, ref_model=ref, progress=False)
    monkeypatch.setattr(dpo, "_shares_prefix", lambda model: False)  # as for an architecture other than LLaVA
    whole = dpo_train(copy.deepcopy(policy), proc, pairs, cfg, ref_model=ref, progress=False)
    assert shared["steps"] == whole["steps"] == 2
    assert shared["loss"] == pytest.approx(whole["loss"], abs=1e-4)
    assert shared["margin"] == pytest.approx(whole["margin"], abs=1e-4)
