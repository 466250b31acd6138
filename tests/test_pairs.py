"Checks of vlmcourse.pairs: the noise schedule, contrastive decoding, error injection, the rewriter interface, SeVa's augmentations, the builder."
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
import random

import numpy as np
import pytest
import torch

from vlmcourse.llava import build_processor, build_vlm, generate
from vlmcourse.pairs import (INJECTIONS, PAIR_SOURCES, SEVA_AUGMENTATIONS, PairConfig, add_diffusion_noise,
                             applicable_injections, build_pairs, colour_jitter, contrastive_logits, decode, hflip,
                             inject_error, missing_partners, noise_schedule, noise_view, random_resized_crop,
                             rewrite_negatives, rule_rewriter, seva_answers, to_image, to_pixels, weakened_answers)
from vlmcourse.world import CAPTION_PROMPT, Scene, ShapeObject, WorldConfig, caption, render, sample_scenes

WCFG = WorldConfig()


@pytest.fixture(scope="module")
def tiny():
    "A tiny LLaVA with random weights, scaled so that its greedy answers vary with the image."
    proc = build_processor(WCFG)
    model = build_vlm(proc, seed=0).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters(): p.add_(torch.randn_like(p) * 0.3)
    return model, proc


# --- the diffusion schedule -------------------------------------------------------------------------------------

def test_schedule_matches_the_formula():
    betas, abar = noise_schedule()
    assert betas.shape == abar.shape == (1000,)
    ramp = torch.linspace(-6, 6, 1000, dtype=torch.float64)
    torch.testing.assert_close(betas, 1 / (1 + torch.exp(-ramp)) * (5e-3 - 1e-5) + 1e-5)
    assert betas[0] == pytest.approx(1e-5 + 4.99e-3 / (1 + math.exp(6)))
    assert abar[0] == pytest.approx(1 - betas[0].item())
    assert abar[500] == pytest.approx(np.prod(1 - betas[:501].numpy()))
    assert (abar.diff() < 0).all()


def test_noise_moments_and_reproducibility():
    x = torch.full((100_000,), -1.5)
    _, abar = noise_schedule()
    xt = add_diffusion_noise(x, 800, torch.Generator().manual_seed(0))
    assert xt.mean().item() == pytest.approx(-1.5 * abar[800].sqrt().item(), abs=0.01)
    assert xt.std().item() == pytest.approx((1 - abar[800]).sqrt().item(), abs=0.01)
    a = noise_view(500, seed=3)(torch.zeros(2, 3, 4, 4))
    b = noise_view(500, seed=3)(torch.zeros(2, 3, 4, 4))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, noise_view(500, seed=4)(torch.zeros(2, 3, 4, 4)))


@pytest.mark.parametrize("t", [-1, 1000, 2.5, "500"])
def test_bad_noise_step(t):
    with pytest.raises(ValueError, match="0..999"):
        add_diffusion_noise(torch.zeros(3), t)
    with pytest.raises(ValueError, match="0..999"):
        noise_view(t)


# --- contrastive decoding ----------------------------------------------------------------------------------------

def test_contrastive_logits_by_hand():
    l = torch.tensor([[2.0, 1.0, math.log(0.1) + 2.0]])  # token 2 has exactly 0.1 x the top probability
    lc = torch.tensor([[3.0, 0.0, 0.0]])
    out = contrastive_logits(l, lc, alpha=1.0, cutoff=0.2)
    assert out[0, 0].item() == pytest.approx(2 * 2.0 - 3.0)
    assert out[0, 1].item() == pytest.approx(2 * 1.0 - 0.0)  # exp(-1) = 0.37 >= 0.2: kept
    assert out[0, 2].item() == float("-inf")  # 0.1 < 0.2: cut
    assert out.argmax().item() == 1  # the contrast flipped the choice
    assert torch.equal(contrastive_logits(l, lc, 0.0, 0.0), l)


def test_decode_is_generate_without_contrast(tiny):
    model, proc = tiny
    scenes = sample_scenes(WCFG, 10, seed=4)
    imgs = [render(s, WCFG) for s in scenes]
    qs = [CAPTION_PROMPT] * 5 + ["is there a ring in the image ?"] * 5
    ref = generate(model, proc, imgs, qs, max_new_tokens=12)
    assert decode(model, proc, imgs, qs, max_new_tokens=12, batch_size=3) == ref
    assert decode(model, proc, imgs, qs, contrast=noise_view(900), alpha=0.0, cutoff=0.0, max_new_tokens=12) == ref


def test_contrastive_decode_matches_a_naive_loop(tiny):
    "Batched, cached contrastive decoding equals a one-image, no-cache loop over full sequences."
    model, proc = tiny
    imgs = [render(s, WCFG) for s in sample_scenes(WCFG, 3, seed=9)]
    pv = to_pixels(proc, imgs)
    noisy = noise_view(700, seed=1)(pv.clone())
    got = decode(model, proc, imgs, CAPTION_PROMPT, view=noise_view(700, seed=1), contrast=lambda p: p, alpha=1.0, cutoff=0.2, max_new_tokens=8)
    tok = proc.tokenizer
    from vlmcourse.llava import chat_prompt
    for k, img in enumerate(imgs):
        enc = proc(images=[img], text=[chat_prompt(proc, CAPTION_PROMPT)], return_tensors="pt")
        ids, new = enc["input_ids"], []
        for _ in range(8):
            with torch.no_grad():
                lp = model(input_ids=ids, pixel_values=noisy[k:k + 1]).logits[:, -1]
                lc = model(input_ids=ids, pixel_values=pv[k:k + 1]).logits[:, -1]
            nxt = contrastive_logits(lp, lc, 1.0, 0.2).argmax(-1)
            new.append(nxt.item())
            if nxt.item() == tok.eos_token_id: break
            ids = torch.cat([ids, nxt[:, None]], 1)
        assert got[k] == tok.decode(new, skip_special_tokens=True).strip()


def test_decode_bad_input(tiny):
    model, proc = tiny
    img = render(sample_scenes(WCFG, 1)[0], WCFG)
    with pytest.raises(ValueError, match="images but"):
        decode(model, proc, [img, img], ["a ?", "b ?", "c ?"])
    with pytest.raises(ValueError, match="alpha"):
        decode(model, proc, [img], CAPTION_PROMPT, alpha=-1)
    with pytest.raises(ValueError, match="decoder must be"):
        weakened_answers(model, proc, [img], CAPTION_PROMPT, decoder="greedy")


def test_pixels_round_trip(tiny):
    _, proc = tiny
    img = render(sample_scenes(WCFG, 1, seed=2)[0], WCFG)
    assert np.array_equal(np.asarray(to_image(proc, to_pixels(proc, [img])[0])), np.asarray(img))


# --- error injection ------------------------------------------------------------------------------------------

def test_add_inserts_the_missing_partner():
    s = Scene((ShapeObject("circle", "red", 0, 0.8),), "counter")
    assert missing_partners(s, WCFG) == ["square"]
    for seed in range(20):
        w, kind = inject_error(s, WCFG, random.Random(seed), "add")
        assert kind == "add" and w.shapes == {"circle", "square"}
        assert caption(w, WCFG) != caption(s, WCFG)


def test_every_injection_changes_the_caption():
    rng = random.Random(0)
    seen = set()
    for s in sample_scenes(WCFG, 200, seed=1, kind="counter") + sample_scenes(WCFG, 200, seed=1, kind="typical"):
        w, kind = inject_error(s, WCFG, rng)
        seen.add(kind)
        assert caption(w, WCFG) != caption(s, WCFG)
        assert kind in applicable_injections(s, WCFG)
    assert seen == set(INJECTIONS)


def test_injection_errors():
    one = Scene((ShapeObject("ring", "red", 0, 0.8),))
    assert "drop" not in applicable_injections(one, WCFG)
    with pytest.raises(ValueError, match="cannot change"):
        inject_error(one, WCFG, random.Random(0), "drop")
    with pytest.raises(ValueError, match="must be one of"):
        inject_error(one, WCFG, random.Random(0), "blur")


# --- the rewriter interface --------------------------------------------------------------------------------------

def test_rule_rewriter_is_text_only():
    rw = rule_rewriter(WCFG, seed=0)
    assert rw("a red circle at top left .").startswith("a red circle at top left and a ")
    assert "square" in rw("a red circle at top left .")
    out = rw("a red ring at top left .")  # no partner to add: a colour changes
    assert out != "a red ring at top left ." and out.endswith("ring at top left .")


def test_rewrite_negatives_drops_failures():
    texts = ["a red circle at top left .", "a blue ring at top right ."]
    assert rewrite_negatives(texts, lambda t: t.replace("red", "green")) == ["a green circle at top left .", None]
    assert rewrite_negatives(texts, lambda t: None) == [None, None]
    with pytest.raises(TypeError, match="function"):
        rewrite_negatives(texts, "not callable")
    with pytest.raises(TypeError, match="not one string"):
        rewrite_negatives("a red circle .", lambda t: t)


# --- SeVa's augmentations ----------------------------------------------------------------------------------------

def test_augmentations_keep_the_size_and_do_what_they_say():
    s = Scene((ShapeObject("square", "red", 0, 0.8),))  # top left
    img = render(s, WCFG)
    red = (np.asarray(hflip(img)) == (230, 40, 40)).all(-1)
    assert red[:16, 16:].sum() > 50 and red[:, :16].sum() == 0  # the square is now at top right
    assert np.array_equal(np.asarray(hflip(hflip(img))), np.asarray(img))
    for seed in range(5):
        assert random_resized_crop(img, random.Random(seed)).size == img.size
        assert colour_jitter(img, random.Random(seed)).size == img.size
    j = np.asarray(colour_jitter(img, random.Random(1), brightness=0, contrast=0, saturation=0, hue=0.25)).astype(int)
    assert not np.array_equal(j, np.asarray(img).astype(int))


def test_seva_answers(tiny):
    model, proc = tiny
    imgs = [render(s, WCFG) for s in sample_scenes(WCFG, len(SEVA_AUGMENTATIONS), seed=3)]
    out = seva_answers(model, proc, imgs, CAPTION_PROMPT, list(SEVA_AUGMENTATIONS), max_new_tokens=6)
    assert len(out) == len(imgs) and all(isinstance(o, str) for o in out)
    flip_only = seva_answers(model, proc, imgs[:2], CAPTION_PROMPT, ["flip", "flip"], max_new_tokens=6)
    assert flip_only == decode(model, proc, [hflip(i) for i in imgs[:2]], CAPTION_PROMPT, max_new_tokens=6)
    with pytest.raises(ValueError, match="unknown augmentations"):
        seva_answers(model, proc, imgs[:1], CAPTION_PROMPT, ["mixup"])


# --- the builder ----------------------------------------------------------------------------------------------------

def test_build_pairs_inject():
    ds = build_pairs(None, None, WCFG, "bpo_inject", 40, seed=0, progress=False)
    assert len(ds) == 40 and set(ds["source"]) == {"bpo_inject"}
    assert {"images", "prompt", "chosen", "rejected", "source", "scene"} <= set(ds.column_names)
    for p, c, r in zip(ds["prompt"], ds["chosen"], ds["rejected"]):
        c, r = c[0]["content"][-1]["text"], r[0]["content"][-1]["text"]
        assert c != r
        if p[0]["content"][-1]["text"] != CAPTION_PROMPT: assert {c, r} == {"yes .", "no ."}
    again = build_pairs(None, None, WCFG, "bpo_inject", 40, seed=0, progress=False)
    assert again["rejected"] == ds["rejected"]  # deterministic given the seed


def test_build_pairs_both_is_half_and_half(tiny):
    model, proc = tiny
    ds = build_pairs(model, proc, WCFG, "bpo_both", 21, seed=1, pcfg=PairConfig(noise_step=900), progress=False)
    assert sorted(ds["source"]).count("bpo_noise") == 11 and sorted(ds["source"]).count("bpo_inject") == 10


@pytest.mark.parametrize("kw, match", [
    (dict(source="human"), "source must be one of"),
    (dict(n=0), "positive integer"),
])
def test_build_pairs_bad_input(kw, match):
    args = dict(source="bpo_inject", n=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        build_pairs(None, None, WCFG, **args)


@pytest.mark.parametrize("kw", [dict(counter_frac=1.5), dict(decoder="beam"), dict(noise_step=1000), dict(seva_augmentations=("mixup",))])
def test_pair_config_validates(kw):
    with pytest.raises(ValueError):
        PairConfig(**kw)


def test_injections_config_restricts_the_rules():
    ds = build_pairs(None, None, WCFG, "bpo_inject", 30, seed=2, pcfg=PairConfig(injections=("add",), caption_frac=1.0), progress=False)
    import json
    for c, r, sc in zip(ds["chosen"], ds["rejected"], ds["scene"]):
        c, r = c[0]["content"][-1]["text"], r[0]["content"][-1]["text"]
        s = Scene.from_dict(json.loads(sc))
        assert r.count(" and ") == c.count(" and ") + 1  # exactly one object added
        added = {w for w in r.split() if w in WCFG.shapes} - s.shapes
        assert len(added) == 1 and (not missing_partners(s, WCFG) or added <= set(missing_partners(s, WCFG)))


def test_negative_stats_and_pair_report():
    from vlmcourse.pairs import negative_stats, pair_report
    s = Scene((ShapeObject("circle", "red", 0, 0.8), ShapeObject("ring", "blue", 3, 0.8)), "counter")
    caps = [caption(s, WCFG), "a red circle at top left and a blue square at top right .", "a red cross at top left ."]
    st = negative_stats(caps, [s] * 3, WCFG)
    assert st["chair_s"] == pytest.approx(2 / 3)
    assert st["names_partner"] == pytest.approx(1 / 3)  # the square is the circle's missing partner
    assert st["names_all_true"] == pytest.approx(1 / 3)
    assert st["differs"] == pytest.approx(2 / 3)
    ds = build_pairs(None, None, WCFG, "bpo_inject", 40, seed=0, progress=False)
    rep = pair_report(ds, WCFG)["bpo_inject"]
    assert rep["chosen_chair_s"] == 0 and rep["chosen_exact"] == 1
    assert 0 < rep["caption_pairs"] < 40
