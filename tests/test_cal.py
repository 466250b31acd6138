"CAL: hand-computed weights, the plain loops against the exported code, degenerate cases, bad input, the reference's flattened pooling, and the second pass on a tiny LLaVA."
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy

import pytest
import torch
import torch.nn.functional as F

from vlmcourse.cal import (CALConfig, cal_loss, cal_loss_fn, cal_weights, image_positions, logits_without_image,
                           reference_cal_weights, step_seconds, visual_correlation)
from vlmcourse.llava import build_processor, build_vlm, sft_batch
from vlmcourse.world import CAPTION_PROMPT, WorldConfig, caption, render, sample_scenes


def plain_weights(logits, no_image, labels, low=1.0, high=5.0, kernel=3):
    "Eqs. 1-3 with loops, written apart from the notebook's."
    B, T, _ = logits.shape
    out = torch.zeros(B, T)
    for b in range(B):
        c = {t: min(max(float(logits[b, t, labels[b, t]] - no_image[b, t, labels[b, t]]), low), high)
             for t in range(T) if labels[b, t] != -100}
        for t in c:
            win = []
            for s in range(t - kernel // 2, t + kernel // 2 + 1):
                lo, hi = min(s, t), max(s, t)
                if all(u in c for u in range(lo, hi + 1)): win.append(c[s])
            out[b, t] = sum(win) / len(win)
    return out


def random_batch(seed=0, B=4, T=10, V=7):
    g = torch.Generator().manual_seed(seed)
    z, z0 = 4 * torch.randn(B, T, V, generator=g), 4 * torch.randn(B, T, V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :3] = -100; y[0, 8:] = -100  # one answer in the middle
    y[1, :2] = -100; y[1, 5] = -100  # two answers, split by one prompt token
    y[2, :9] = -100  # an answer of one token
    y[3, :1] = -100  # an answer up to the end
    return z, z0, y


# --- the weights and the loss ---------------------------------------------------------------------------------

def test_hand_computed():
    labels = torch.tensor([[-100, -100, -100, 2, 0, 1]])
    z, z0 = torch.zeros(1, 6, 4), torch.zeros(1, 6, 4)
    z[0, 3, 2], z[0, 4, 0], z[0, 5, 1] = 4.0, 0.2, 7.0  # clamped: 4, 1, 5
    z0[0, 1, 0] = -50.0  # a prompt position: ignored
    w = cal_weights(z, z0, labels)
    assert w[0].tolist() == pytest.approx([0, 0, 0, 2.5, 10 / 3, 3.0])
    # kernel 1: the clamped values; wider bounds: the raw differences
    assert cal_weights(z, z0, labels, kernel=1)[0, 3:].tolist() == pytest.approx([4.0, 1.0, 5.0])
    assert cal_weights(z, z0, labels, low=0.0, high=10.0, kernel=1)[0, 3:].tolist() == pytest.approx([4.0, 0.2, 7.0])


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_plain_loops(kernel, seed):
    z, z0, y = random_batch(seed)
    torch.testing.assert_close(cal_weights(z, z0, y, kernel=kernel), plain_weights(z, z0, y, kernel=kernel), atol=1e-5, rtol=1e-5)


def test_zero_off_answers_and_within_clamp():
    z, z0, y = random_batch()
    w = cal_weights(z, z0, y, low=1.5, high=3.0)
    a = y != -100
    assert (w[~a] == 0).all()
    assert (w[a] >= 1.5 - 1e-6).all() and (w[a] <= 3.0 + 1e-6).all()
    assert not w.requires_grad


def test_window_does_not_cross_a_gap():
    # answer tokens at 0-1 and 3-4, a prompt token at 2; the image helps token 1 by 5 and token 3 by 1
    y = torch.tensor([[0, 0, -100, 0, 0]])
    z, z0 = torch.zeros(1, 5, 2), torch.zeros(1, 5, 2)
    z[0, 1, 0] = 5.0
    w = cal_weights(z, z0, y)
    assert w[0].tolist() == pytest.approx([3.0, 3.0, 0.0, 1.0, 1.0])  # the 5 stays in its own answer


def test_equal_weights_are_cross_entropy():
    z, z0, y = random_batch()
    ce = F.cross_entropy(z.flatten(0, 1), y.flatten(), ignore_index=-100)
    for c in (1.0, 2.5):
        torch.testing.assert_close(cal_loss(z, y, torch.full(y.shape, c)), ce)
    torch.testing.assert_close(cal_loss(z, y, cal_weights(z, z0, y, low=3.0, high=3.0)), ce)  # one clamp value: every weight equal


def test_loss_hand_computed():
    z = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))  # log-probabilities are logits too
    y = torch.tensor([[-100, 0, 1]])
    w = torch.tensor([[7.0, 1.0, 3.0]])  # the prompt's weight is ignored
    expected = (1 * -torch.log(torch.tensor(0.9)) + 3 * -torch.log(torch.tensor(0.8))) / 4
    torch.testing.assert_close(cal_loss(z, y, w), expected)


def test_loss_gradient_does_not_flow_into_weights():
    z, z0, y = random_batch()
    z = z.clone().requires_grad_()
    w = torch.ones(y.shape, requires_grad=True)
    cal_loss(z, y, w).backward()
    assert z.grad is not None and w.grad is None


def test_one_answer_token():
    z, z0, y = random_batch()
    d = visual_correlation(z, z0, y)
    w = cal_weights(z, z0, y)
    assert w[2, 9].item() == pytest.approx(d[2, 9].clamp(1, 5).item())
    assert (w[2, :9] == 0).all()
    one = y[2:3]  # a batch whose only answer is one token: the loss is that token's cross-entropy
    assert cal_loss(z[2:3], one, w[2:3]).item() == pytest.approx(F.cross_entropy(z[2, 9:], y[2, 9:]).item(), rel=1e-5)


def test_all_labels_ignored_is_an_error():
    z, z0, y = random_batch()
    none = torch.full_like(y, -100)
    with pytest.raises(ValueError, match="no answer tokens"): cal_weights(z, z0, none)
    with pytest.raises(ValueError, match="no answer tokens"): cal_loss(z, none, torch.ones(y.shape))
    with pytest.raises(ValueError, match="no answer tokens"): reference_cal_weights(z, z0, none)


@pytest.mark.parametrize("kw, match", [(dict(kernel=2), "odd integer"), (dict(kernel=0), "odd integer"), (dict(kernel=-3), "odd integer"),
                                       (dict(kernel=3.0), "odd integer"), (dict(kernel=True), "odd integer"),
                                       (dict(low=5.0, high=1.0), "must not exceed")])
def test_bad_settings(kw, match):
    z, z0, y = random_batch()
    with pytest.raises(ValueError, match=match): cal_weights(z, z0, y, **kw)


def test_bad_shapes_and_labels():
    z, z0, y = random_batch()
    with pytest.raises(ValueError, match="must be the same"): cal_weights(z, z0[:, :-1], y)
    with pytest.raises(ValueError, match="labels must have shape"): cal_weights(z, z0, y[:, 1:])
    with pytest.raises(ValueError, match=r"\[B, T, V\]"): cal_weights(z[0], z0[0], y[0])
    with pytest.raises(TypeError, match="torch.Tensor"): cal_weights(z, z0, y.tolist())
    bad = y.clone(); bad[0, 4] = 7
    with pytest.raises(ValueError, match=r"token ids in \[0, 7\)"): cal_weights(z, z0, bad)
    w = torch.ones(y.shape)
    with pytest.raises(ValueError, match=r"\[B, T\]"): cal_loss(z, y, w[:, 1:])
    with pytest.raises(ValueError, match=">= 0"): cal_loss(z, y, -w)
    with pytest.raises(ValueError, match="sum to zero"): cal_loss(z, y, torch.zeros(y.shape))
    with pytest.raises(ValueError, match="kernel"): CALConfig(kernel=4)
    with pytest.raises(ValueError, match="must not exceed"): CALConfig(low=2.0, high=1.0)
    with pytest.raises(TypeError, match="CALConfig"): cal_loss_fn({"low": 1.0})


# --- the reference's pooling over the flattened batch ----------------------------------------------------------

def test_reference_mixes_neighbouring_sequences():
    # two rows of 4; row 0's answer runs to its end, row 1's answer starts at its first position
    y = torch.tensor([[-100, 0, 0, 0], [0, 0, -100, -100]])
    z, z0 = torch.zeros(2, 4, 2), torch.zeros(2, 4, 2)
    z[1, 0, 0] = 5.0  # row 1's first token is visual (5); everything else is 1 after the clamp
    ours, ref = cal_weights(z, z0, y), reference_cal_weights(z, z0, y)
    assert ours[0].tolist() == pytest.approx([0, 1, 1, 1])  # row 0 knows nothing of row 1
    assert ref[0, 3].item() == pytest.approx((1 + 1 + 5) / 3)  # the reference: row 0's last token averages with row 1's first
    assert ref[1, 0].item() == pytest.approx((1 + 5 + 1) / 3)  # and row 1's first token with row 0's last
    assert ours[1, 0].item() == pytest.approx((5 + 1) / 2)
    # the reference weighs the prompt and padding positions too (token 0's difference, clamped): never 0
    assert (ref[y == -100] >= 1).all()


def test_ours_do_not_depend_on_the_batch():
    z, z0, y = random_batch()
    w = cal_weights(z, z0, y)
    for b in range(4):
        torch.testing.assert_close(cal_weights(z[b:b + 1], z0[b:b + 1], y[b:b + 1])[0], w[b])
    ref, ref_alone = reference_cal_weights(z, z0, y), torch.cat([reference_cal_weights(z[b:b + 1], z0[b:b + 1], y[b:b + 1]) for b in range(4)])
    a = y != -100
    assert (ref[a] - ref_alone[a]).abs().max() > 1e-3  # the reference's weights change with the batch
    # inside an answer, away from its ends, the two methods agree
    inner = a & F.pad(a, (1, 0))[:, :-1] & F.pad(a, (0, 1))[:, 1:]
    torch.testing.assert_close(ref[inner], w[inner])


# --- the second pass on a tiny LLaVA ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    wcfg = WorldConfig()
    proc = build_processor(wcfg)
    model = build_vlm(proc, seed=0).eval()
    scenes = sample_scenes(wcfg, 4, seed=0)
    batch = sft_batch(proc, [render(s, wcfg) for s in scenes], [CAPTION_PROMPT] * 4, [caption(s, wcfg) for s in scenes])
    return model, proc, batch


def test_no_image_pass_masks_the_image(tiny):
    model, proc, batch = tiny
    img = image_positions(model, batch["input_ids"])
    assert img.sum(1).tolist() == [model.config.image_seq_length] * 4
    text = ~img & batch["attention_mask"].bool()
    mask = batch["attention_mask"].clone(); mask[img] = 0
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=mask, pixel_values=batch["pixel_values"]).logits
        other = model(input_ids=batch["input_ids"], attention_mask=mask, pixel_values=torch.randn_like(batch["pixel_values"])).logits
        seen = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    ours = logits_without_image(model, batch)
    torch.testing.assert_close(ours[text], full[text], atol=1e-5, rtol=1e-5)  # the vision tower skipped: the same numbers
    torch.testing.assert_close(other[text], full[text], atol=1e-6, rtol=1e-6)  # the image's content cannot reach the text
    assert (seen[text] - full[text]).abs().max() > 1e-4  # with the image visible, it does
    assert not ours.requires_grad


def test_no_image_pass_needs_an_image(tiny):
    model, proc, batch = tiny
    text_only = sft_batch(proc, None, ["describe the image ."], ["a red circle at top left ."])
    with pytest.raises(ValueError, match="no <image>"): logits_without_image(model, text_only)


def test_loss_fn_with_unit_weights_is_the_models_loss(tiny):
    model, proc, batch = tiny
    with torch.no_grad():
        torch.testing.assert_close(cal_loss_fn(CALConfig(low=1.0, high=1.0))(model, batch), model(**batch).loss, atol=1e-5, rtol=1e-5)


def test_loss_fn_trains(tiny):
    model, proc, batch = tiny
    m = copy.deepcopy(model).train()
    stats, fn = [], None
    fn = cal_loss_fn(CALConfig(), stats)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = fn(m, batch); loss.backward(); opt.step(); opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert len(stats) == 15 and all(1.0 <= s["mean_weight"] <= 5.0 and 0.0 <= s["at_high"] <= 1.0 for s in stats)


def test_step_seconds(tiny):
    model, proc, batch = tiny
    r = step_seconds(model, [batch] * 3)
    assert r["ce_seconds"] > 0 and r["cal_seconds"] > 0 and r["ratio"] == pytest.approx(r["cal_seconds"] / r["ce_seconds"])
    with pytest.raises(ValueError, match="no batches"): step_seconds(model, [])
