import json, random
import numpy as np
import pytest
from vlmcourse.world import (WorldConfig, Scene, sample_scenes, sample_scene, render, caption, questions, object_mask,
                             cell_box, pope_probes, POPE_SPLITS, cooccurrence, to_dataset, build_tokenizer, is_typical,
                             world_words)

cfg = WorldConfig()

def test_deterministic_and_seeded():
    assert sample_scenes(cfg, 30, seed=1) == sample_scenes(cfg, 30, seed=1)
    assert sample_scenes(cfg, 30, seed=1) != sample_scenes(cfg, 30, seed=2)
    a, b = sample_scenes(cfg, 5, seed=1)[0], sample_scenes(cfg, 5, seed=1)[0]
    assert np.array_equal(np.asarray(render(a, cfg)), np.asarray(render(b, cfg)))

def test_scene_invariants():
    for s in sample_scenes(cfg, 300, seed=0):
        assert cfg.min_objects <= len(s.objects) <= cfg.max_objects
        assert len(s.shapes) == len(s.objects), "shapes in a scene are distinct"
        assert len({o.cell for o in s.objects}) == len(s.objects), "one object per cell"

def test_kinds():
    assert all(is_typical(s, cfg) for s in sample_scenes(cfg, 100, kind="typical"))
    counter = sample_scenes(cfg, 100, kind="counter")
    assert all(any(a in s.shapes and b not in s.shapes for a, b in cfg.partners) for s in counter)
    with pytest.raises(ValueError, match="kind must be"): sample_scene(cfg, random.Random(0), "weird")

def test_pixels_are_where_the_scene_says():
    for s in sample_scenes(cfg, 50, seed=3):
        img = render(s, cfg)
        for o in s.objects:
            m = object_mask(img, o)
            x0, y0, x1, y1 = map(int, cell_box(o.cell, cfg))
            inside = m[y0:y1, x0:x1].sum()
            assert inside >= 10
            same_colour = [p for p in s.objects if p.colour == o.colour]
            if len(same_colour) == 1: assert inside == m.sum()
    empty = render(Scene(()), cfg)
    assert (np.asarray(empty) == np.array(cfg.background)).all()

def test_caption_and_questions():
    s = sample_scenes(cfg, 1, seed=0)[0]
    c = caption(s, cfg)
    for o in s.objects: assert f"{o.colour} {o.shape} at {cfg.positions[o.cell]}" in c
    qa = dict(questions(s, cfg))
    assert qa["how many objects are there ?"].split()[0] in ("one", "two", "three")

def test_prior_dial():
    i, j = cfg.shapes.index("circle"), cfg.shapes.index("square")
    M = cooccurrence(sample_scenes(cfg, 1500), cfg)
    assert M[i, j] > 0.9
    from dataclasses import replace
    M0 = cooccurrence(sample_scenes(replace(cfg, prior_strength=0.0), 1500), cfg)
    assert M0[i, j] < 0.5

@pytest.mark.parametrize("split", POPE_SPLITS)
def test_pope_probes_follow_rules(split):
    scenes = sample_scenes(cfg, 60, seed=5, kind="counter")
    probes = pope_probes(scenes, cfg, split)
    for k, s in enumerate(scenes):
        ps = [p for p in probes if p["scene_idx"] == k]
        yes = [p for p in ps if p["label"] == "yes"]; no = [p for p in ps if p["label"] == "no"]
        assert len(yes) == min(3, len(s.shapes)) and len(no) == len(yes)
        assert all(p["shape"] in s.shapes for p in yes) and all(p["shape"] not in s.shapes for p in no)

def test_adversarial_asks_missing_partner():
    s = Scene((sample_scenes(cfg, 1)[0].objects[0].__class__("circle", "red", 0, 0.8),), "counter")
    probes = pope_probes([s], cfg, "adversarial")
    assert "square" in [p["shape"] for p in probes if p["label"] == "no"]

def test_dataset_roundtrip():
    scenes = sample_scenes(cfg, 4, seed=2)
    ds = to_dataset(scenes, cfg)
    assert len(ds) == 4 and ds[1]["caption"] == caption(scenes[1], cfg)
    assert Scene.from_dict(json.loads(ds[3]["scene"])) == scenes[3]
    assert np.array_equal(np.asarray(ds[0]["image"].convert("RGB")), np.asarray(render(scenes[0], cfg)))

def test_tokenizer_roundtrip():
    tok = build_tokenizer(cfg)
    for s in sample_scenes(cfg, 20):
        for q, a in questions(s, cfg):
            ids = tok(q + " " + a)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == q + " " + a
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0

def test_config_validation():
    with pytest.raises(ValueError, match="max_objects"): WorldConfig(max_objects=5)
    with pytest.raises(ValueError, match="partner"): WorldConfig(partners=(("circle", "hexagon"),))


def test_a_prior_that_cannot_be_met_fails_with_a_message():
    "A world whose every shape needs a partner but holds one object: a clear ValueError, not an endless loop."
    import random
    import pytest
    from vlmcourse.world import WorldConfig, sample_scene
    cfg = WorldConfig(shapes=("circle", "square"), max_objects=1, partners=(("circle", "square"), ("square", "circle")), prior_strength=1.0)
    for kind in ("prior", "typical"):
        with pytest.raises(ValueError, match="tries"): sample_scene(cfg, random.Random(0), kind)


def test_describe_first_and_final_answer():
    from vlmcourse.world import describe_first, final_answer, questions
    w = WorldConfig()
    for s in sample_scenes(w, 30, seed=2):
        for q, a in questions(s, w)[1:]:  # presence, colour, position, count
            long = describe_first(s, w, q, a)
            assert final_answer(long) == a and final_answer(a) == a
            assert (long != a) == q.startswith(("what colour is the ", "where is the "))
    assert final_answer("a red square at top left . the square is at top left .") == "top left ."
    with pytest.raises(TypeError, match="string"): final_answer(None)
