"PixelLLM: the point loss by hand and against loops, the world's targets, the head and its location slot, saving and loading, batches and the loss, on a tiny untrained LLaVA."
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy, json

import numpy as np
import pytest
import torch

from vlmcourse.llava import build_processor, build_vlm, load_vlm, sft_batch
from vlmcourse.pixelllm import (HEAD_WEIGHTS, LOCATION_PROMPT, PIXEL_KEYS, PixelBatches, PixelHead, PixelHeadConfig, PixelTrainConfig,
                                attach_head, cell_of, describe_at, ground_words, grounded_image, grounding_rows, load_pixelllm, location_prompt,
                                location_rows, object_centre, pixel_examples, pixel_head, pixel_loss_fn, point_loss, save_pixelllm,
                                word_objects, word_targets)
from vlmcourse.world import CAPTION_PROMPT, WorldConfig, caption, cell_box, object_mask, render, sample_scenes

WCFG = WorldConfig()


@pytest.fixture(scope="module")
def proc():
    return build_processor(WCFG)


@pytest.fixture(scope="module")
def tiny(proc):
    return build_vlm(proc, seed=0).eval()


@pytest.fixture()
def with_head(tiny, proc):
    torch.manual_seed(0)
    return attach_head(copy.deepcopy(tiny), PixelHead(64), tokenizer=proc.tokenizer).eval()


# --- the point loss ---------------------------------------------------------------------------------------------

def test_point_loss_hand_computed():
    pred = torch.tensor([[[0.1, 0.2], [0.5, 0.5], [0.9, 0.9]], [[0.0, 0.0], [0.25, 1.0], [0.6, 0.6]]])
    target = torch.tensor([[[0.2, 0.4], [0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [0.75, 0.5], [0.6, 0.6]]])
    mask = torch.tensor([[True, False, True], [False, True, False]])
    # masked errors: 0.1, 0.2, 0.1, 0.1, then 0.5, 0.5 -> 1.5 / 6
    assert point_loss(pred, target, mask).item() == pytest.approx(0.25, abs=1e-7)
    assert point_loss(pred[:1], target[:1], mask[:1]).item() == pytest.approx(0.125, abs=1e-7)


def test_point_loss_matches_loops_and_gradient():
    g = torch.Generator().manual_seed(1)
    p, t = torch.rand(3, 7, 2, generator=g, requires_grad=True), torch.rand(3, 7, 2, generator=g)
    m = torch.rand(3, 7, generator=g) < 0.4
    errs = [abs(float(p.detach()[b, i, c]) - float(t[b, i, c])) for b in range(3) for i in range(7) if m[b, i] for c in range(2)]
    loss = point_loss(p, t, m)
    assert loss.item() == pytest.approx(sum(errs) / len(errs), abs=1e-6)
    loss.backward()
    assert (p.grad[~m] == 0).all() and (p.grad[m].abs() == 1 / len(errs)).all()


@pytest.mark.parametrize("bad, msg", [
    (lambda p, t, m: (p, t, torch.zeros_like(m)), "the mask is empty"),
    (lambda p, t, m: (p[0], t[0], m[0]), "[B, T, 2]"),
    (lambda p, t, m: (p, t[:, :2], m), "must be the same"),
    (lambda p, t, m: (p, t, m.float()), "bool tensor"),
    (lambda p, t, m: (p, t, m[:, :2]), "mask must have shape [B, T]"),
    (lambda p, t, m: (p, t + 1.5, m), "[0, 1]^2"),
    (lambda p, t, m: (p.tolist(), t, m), "must be a torch.Tensor"),
])
def test_point_loss_refuses_bad_input(bad, msg):
    p, t, m = torch.rand(2, 3, 2), torch.rand(2, 3, 2), torch.tensor([[True, False, False], [False, False, True]])
    with pytest.raises((ValueError, TypeError), match=None) as e: point_loss(*bad(p, t, m))
    assert msg in str(e.value)


# --- targets from the world ---------------------------------------------------------------------------------------

def test_object_centre_is_where_it_is_drawn():
    for s in sample_scenes(WCFG, 30, seed=4):
        img = render(s, WCFG)
        for o in s.objects:
            x0, y0, x1, y1 = (int(v) for v in cell_box(o.cell, WCFG))
            ys, xs = np.nonzero(object_mask(img, o)[y0:y1, x0:x1])  # its own cell: two objects may share a colour
            xs, ys = xs + x0, ys + y0
            cx, cy = object_centre(o, WCFG)
            assert abs((xs.min() + xs.max() + 1) / 2 - cx) <= 0.5 and abs((ys.min() + ys.max() + 1) / 2 - cy) <= 0.5


def test_word_targets():
    s = next(s for s in sample_scenes(WCFG, 50, seed=2) if len(s.objects) == 2)
    words = caption(s, WCFG).split()
    t = word_targets(words, s, WCFG)
    located = [(w, p) for w, p in zip(words, t) if p is not None]
    assert [w for w, _ in located] == [s.objects[0].colour, s.objects[0].shape, s.objects[1].colour, s.objects[1].shape]
    for (w, p), o in zip(located, [s.objects[0]] * 2 + [s.objects[1]] * 2):
        assert p == tuple(c / WCFG.image_size for c in object_centre(o, WCFG))
    # a hallucinated shape and its colour have no target; a colour word alone has none
    absent = next(sh for sh in WCFG.shapes if sh not in s.shapes)
    assert word_objects(["a", "red", absent, "and", "blue"], s, WCFG) == [None] * 5


def test_cell_of():
    assert [cell_of(x, y, WCFG) for x, y in ((0, 0), (15.99, 0), (16, 0), (0, 16), (31.99, 31.99), (99, 99), (-5, 20))] == [0, 0, 1, 2, 3, 3, 2]


# --- the head and the location slot -------------------------------------------------------------------------------

def test_head_shapes_and_config():
    h = PixelHead(64)
    assert h(torch.randn(2, 3, 64)).shape == (2, 3, 2)
    assert h.encode_location(torch.rand(5, 2)).shape == (5, 64)
    with pytest.raises(ValueError, match="hidden must be"): h(torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"\[0, 1\]\^2"): h.encode_location(torch.tensor([[-0.1, 0.5]]))
    with pytest.raises(ValueError, match="fourier must be"): PixelHeadConfig(fourier=0)
    with pytest.raises(TypeError, match="PixelHeadConfig"): PixelHead(64, {"hidden": 8})
    a, b = PixelHead(64), PixelHead(64)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # seeded


def test_location_slot(tiny, proc, with_head):
    scenes = sample_scenes(WCFG, 3, seed=0)
    b = sft_batch(proc, [render(s, WCFG) for s in scenes], [CAPTION_PROMPT, LOCATION_PROMPT, LOCATION_PROMPT], ["a red circle ."] * 3)
    b.pop("labels")
    with torch.no_grad():
        plain = tiny(**b).logits
        assert torch.equal(with_head(**b).logits, plain)  # inert without points
        with location_prompt(with_head, [[0.1, 0.1], [0.1, 0.1], [0.9, 0.2]]): z = with_head(**b).logits
        assert with_head.pixel_head.pending is None  # cleared on exit
    assert torch.equal(z[0], plain[0])  # no slot in a caption prompt
    assert (z[1] - plain[1]).abs().max() > 1e-4 and (z[1] - z[2]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="points must be"):
        with location_prompt(with_head, [0.1, 0.2]): pass
    with pytest.raises(ValueError, match=r"\[0, 1\]\^2"):
        with location_prompt(with_head, [[1.1, 0.2]]): pass
    with pytest.raises(ValueError, match="3 prompts"):
        with location_prompt(with_head, [[0.5, 0.5]] * 2), torch.no_grad(): with_head(**b)
    with pytest.raises(ValueError, match="no point head"): pixel_head(tiny)
    with pytest.raises(ValueError, match="already has"): attach_head(with_head, PixelHead(64))


# --- saving and loading ----------------------------------------------------------------------------------------

def test_save_and_load(tmp_path, tiny, proc, with_head):
    s = sample_scenes(WCFG, 2, seed=1)
    imgs, caps = [render(x, WCFG) for x in s], [caption(x, WCFG) for x in s]
    folder = save_pixelllm(with_head, proc, tmp_path / "px", history={"steps": 0})
    back, bproc = load_pixelllm(folder, device="cpu")
    assert ground_words(back, bproc, imgs, caps) == ground_words(with_head, proc, imgs, caps)
    assert describe_at(back, bproc, imgs, [[0.25, 0.25], [0.75, 0.75]]) == describe_at(with_head, proc, imgs, [[0.25, 0.25], [0.75, 0.75]])
    plain, _ = load_vlm(folder, device="cpu")  # a plain LLaVA checkpoint
    assert not hasattr(plain, "pixel_head") and not any("pixel_head" in k for k in plain.state_dict())
    b = sft_batch(proc, imgs, [CAPTION_PROMPT] * 2, caps)
    b.pop("labels")
    with torch.no_grad(): assert torch.equal(plain(**b).logits, tiny(**b).logits)
    assert json.loads((folder / "history.json").read_text()) == {"steps": 0}
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"): load_pixelllm(tmp_path / "nowhere")
    tiny.save_pretrained(tmp_path / "plain"); proc.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no point head"): load_pixelllm(tmp_path / "plain")
    (folder / HEAD_WEIGHTS).write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="corrupted or incomplete"): load_pixelllm(folder)
    with pytest.raises(ValueError, match="no point head"): save_pixelllm(tiny, proc, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_ground_words_returns_the_words(with_head, proc):
    s = sample_scenes(WCFG, 1, seed=3)[0]
    g = ground_words(with_head, proc, render(s, WCFG), caption(s, WCFG))
    assert [w for w, _, _ in g] == caption(s, WCFG).split()
    assert all(0 <= x <= WCFG.image_size and 0 <= y <= WCFG.image_size for _, x, y in g)
    with pytest.raises(TypeError, match="one string per image"): ground_words(with_head, proc, [render(s, WCFG)], "a")


# --- data, batches and the loss ---------------------------------------------------------------------------------

def test_batches_put_targets_on_their_words(proc):
    pcfg = PixelTrainConfig(location_frac=0.5)
    ex = pixel_examples(pcfg, 64, seed=0)
    assert 16 < sum(e["location"] is not None for e in ex) < 48
    ds = PixelBatches(proc, WCFG, ex, 32)
    assert len(ds) == 2
    b = ds[1]
    for r, e in enumerate(ex[32:]):
        toks = proc.tokenizer.convert_ids_to_tokens(b["input_ids"][r][b["point_mask"][r]])
        want = [w for w, t in zip(e["answer"].split(), word_targets(e["answer"].split(), e["scene"], WCFG)) if t is not None]
        assert toks == want
        assert (b["labels"][r][b["point_mask"][r]] != -100).all()  # answer positions
        if e["location"] is not None:
            o = next(o for o in e["scene"].objects if e["answer"] == f"a {o.colour} {o.shape} .")
            assert cell_of(e["location"][0] * 32, e["location"][1] * 32, WCFG) == o.cell  # the point stays on the object
            assert torch.allclose(b["locations"][r], torch.tensor(e["location"]))
    with pytest.raises(IndexError): ds[2]


def test_loss_fn(with_head, proc):
    ds = PixelBatches(proc, WCFG, pixel_examples(PixelTrainConfig(), 16, seed=1), 16)
    b = ds[0]
    stats = []
    loss = pixel_loss_fn(0.5, stats)(with_head, b)
    assert loss.item() == pytest.approx(stats[0]["caption"] + 0.5 * stats[0]["point"], rel=1e-5)
    with_head.zero_grad(set_to_none=True)
    pixel_loss_fn(0.0)(with_head, b).backward()
    assert all(p.grad is None for p in with_head.pixel_head.point.parameters())
    assert any(p.grad is not None for p in with_head.pixel_head.location.parameters()) == any(e["location"] is not None for e in ds.examples)
    with_head.zero_grad(set_to_none=True)
    assert set(PIXEL_KEYS) <= set(b)


def test_config_checks():
    with pytest.raises(ValueError, match="point_weight"): PixelTrainConfig(point_weight=-1)
    with pytest.raises(ValueError, match="jitter"): PixelTrainConfig(jitter=1.0)
    with pytest.raises(ValueError, match="location_frac"): PixelTrainConfig(location_frac=1.5)


def test_rows_on_a_tiny_model(with_head, proc):
    scenes = sample_scenes(WCFG, 3, seed=0, kind="counter")
    absent = [next(sh for sh in WCFG.shapes if sh not in s.shapes) for s in scenes]
    caps = [caption(s, WCFG)[:-2] + f" and a red {a} at top left ." for s, a in zip(scenes, absent)]
    rows = grounding_rows(with_head, proc, scenes, WCFG, caps)
    hall = [r for r in rows if r["status"] == "hallucinated"]
    assert len(hall) == 6 and {r["type"] for r in hall} == {"colour", "shape"}
    assert all(r["named_cell"] == 0 for r in hall)
    assert sum(r["status"] == "present" for r in rows) == 2 * sum(len(s.objects) for s in scenes)
    locs = location_rows(with_head, proc, scenes, WCFG)
    assert len(locs) == sum(len(s.objects) for s in scenes) and all(isinstance(r["reply"], str) for r in locs)


def test_registered():
    from vlmcourse.registry import model_entry
    e = model_entry("pixelllm")
    assert e.loader == "vlmcourse.pixelllm:load_pixelllm" and e.lesson == "10_pixelllm"


def test_grounded_image(with_head, proc):
    s = sample_scenes(WCFG, 1, seed=3)[0]
    img = render(s, WCFG)
    pic, text = grounded_image(with_head, proc, img, caption(s, WCFG), scale=4)
    assert pic.size == (128, 128) and text == caption(s, WCFG)
    assert pic != img.resize((128, 128))  # something was drawn
    plain, _ = grounded_image(with_head, proc, img, caption(s, WCFG), words=(), scale=4)
    assert plain == img.resize((128, 128), 0)  # no word chosen: the enlarged image alone
    with pytest.raises(TypeError, match="PIL image"): grounded_image(with_head, proc, "x.png")


def test_demo_grounds_a_model_with_a_point_head(with_head, tiny, proc):
    from vlmcourse.demo import SideBySide, ground_both, scene_truth
    s = sample_scenes(WCFG, 1, seed=5)[0]
    sbs = SideBySide(left=(with_head, proc), right=(tiny, proc))
    left, right, md = ground_both(sbs, None, scene_truth(s, WCFG))
    assert left.size == (WCFG.image_size * sbs.cfg.display_scale,) * 2 and right is None
    assert "no point head" in md and md.count("**") == 4
