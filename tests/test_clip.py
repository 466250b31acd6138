"Tests of vlmcourse.clip: the loss against transformers' CLIPModel, its limits, the text tower's pooling, and the vision tower's reuse."
import math, os
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import CLIPVisionModel

from vlmcourse.clip import (ClipTrainConfig, VisionTowerConfig, vision_config, build_clip, clip_cache_key, clip_config, clip_eot_id, clip_history, clip_loss, clip_model,
                            clip_pixel_values, clip_text_inputs, clip_vision_state_dict, embed_images, embed_texts,
                            object_prompts, retrieval_recall, zero_shot_scores)
from vlmcourse.llava import LlavaModelConfig, build_processor, build_vlm
from vlmcourse.cache import config_key
from vlmcourse.world import WorldConfig, caption, render, sample_scenes

torch.set_num_threads(1)
CFG = ClipTrainConfig()
# A CLIP small enough to train in a second or two: 4 steps of 64 pairs, starting above its clip (scale 50 > 15).
TINY = ClipTrainConfig(n_scenes=256, epochs=1, batch_size=64, logit_scale_init=math.log(50.0), max_logit_scale=math.log(15.0), seed=3)


def _inputs(cfg, n=12, seed=5):
    scenes = sample_scenes(cfg.world, n, seed=seed)
    return clip_pixel_values([render(s, cfg.world) for s in scenes], cfg), clip_text_inputs([caption(s, cfg.world) for s in scenes], cfg.world)


@pytest.mark.parametrize("logit_scale", [None, 0.0, 3.5, math.log(100)])
def test_loss_matches_transformers(logit_scale):
    model = build_clip(CFG).eval()
    if logit_scale is not None:
        with torch.no_grad(): model.logit_scale.fill_(logit_scale)
    pix, txt = _inputs(CFG)
    with torch.no_grad():
        ref = model(**txt, pixel_values=pix, return_loss=True)
        img = model.get_image_features(pixel_values=pix).pooler_output
        tx = model.get_text_features(**txt).pooler_output
    assert not torch.allclose(img.norm(dim=-1), torch.ones(len(img)))  # really unnormalised inputs
    torch.testing.assert_close(clip_loss(img, tx, model.logit_scale), ref.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(clip_loss(img, tx, model.logit_scale.item()), ref.loss, atol=1e-5, rtol=0)


def test_loss_is_the_mean_of_both_cross_entropies():
    g = torch.Generator().manual_seed(0)
    u, v, t = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64), 1.7
    cos = torch.stack([torch.stack([(a @ b) / (a.norm() * b.norm()) for b in v]) for a in u])
    L = math.exp(t) * cos
    rows = -(L.diag() - L.logsumexp(1)).mean()
    cols = -(L.diag() - L.logsumexp(0)).mean()
    torch.testing.assert_close(clip_loss(u, v, t), (rows + cols) / 2)


def test_degenerate_cases():
    B, D = 8, 16
    g = torch.Generator().manual_seed(1)
    assert clip_loss(torch.randn(1, D, generator=g), torch.randn(1, D, generator=g), 2.0).item() == 0.0
    same = torch.randn(1, D, generator=g).expand(B, D)
    assert clip_loss(same, same, 3.0).item() == pytest.approx(math.log(B), abs=1e-5)
    assert clip_loss(torch.randn(B, D, generator=g), torch.randn(B, D, generator=g), -40.0).item() == pytest.approx(math.log(B), abs=1e-5)
    eye = torch.eye(B, D)
    assert clip_loss(eye, eye, math.log(1e4)).item() == pytest.approx(0.0, abs=1e-6)
    assert clip_loss(eye, eye, 1.0).item() == pytest.approx(math.log(1 + (B - 1) * math.exp(-math.e)), abs=1e-5)
    losses = [clip_loss(eye, eye, t).item() for t in (-5, 0, 1, 2, 3)]
    assert losses == sorted(losses, reverse=True)  # a sharper softmax only helps when the pairs are right


def test_bad_inputs():
    u = torch.randn(4, 8)
    with pytest.raises(ValueError, match="same shape"): clip_loss(u, u[:3], 1.0)
    with pytest.raises(ValueError, match=r"\[B, D\]"): clip_loss(u[0], u[0], 1.0)
    with pytest.raises(ValueError, match=r"\[B, D\]"): clip_loss(u[None], u[None], 1.0)
    with pytest.raises(ValueError, match="scalar"): clip_loss(u, u, torch.ones(3))
    with pytest.raises(ValueError, match="empty"): clip_loss(u[:0], u[:0], 1.0)
    with pytest.raises(ValueError, match="all zeros"): clip_loss(u, torch.zeros(4, 8), 1.0)
    with pytest.raises(TypeError, match="torch.Tensor"): clip_loss(u.tolist(), u, 1.0)
    with pytest.raises(TypeError, match="floating"): clip_loss(u.long(), u.long(), 1.0)


def test_text_tower_pools_at_end_of_text():
    model = build_clip(CFG).eval()
    texts = ["a red circle at top left .", "a blue square at bottom right and a green ring at top left ."]
    enc = clip_text_inputs(texts, CFG.world)
    eot = clip_eot_id(CFG.world)
    assert model.config.text_config.eos_token_id == eot == model.config.text_config.vocab_size - 1
    with torch.no_grad(): out = model.text_model(**enc)
    for i, n in enumerate(enc["attention_mask"].sum(1).tolist()):
        assert enc["input_ids"][i, n - 1] == eot and (enc["input_ids"][i, n:] == 0).all()
        torch.testing.assert_close(out.pooler_output[i], out.last_hidden_state[i, n - 1])


def test_text_inputs_errors():
    w = CFG.world
    with pytest.raises(TypeError, match="list of strings"): clip_text_inputs("a red circle", w)
    with pytest.raises(ValueError, match="not words of this world"): clip_text_inputs(["a purple elephant"], w)
    with pytest.raises(ValueError, match="non-empty"): clip_text_inputs([""], w)
    with pytest.raises(ValueError, match="at most"): clip_text_inputs(["a red circle at top left ."], w, max_len=5)


def test_config_checks():
    with pytest.raises(ValueError, match="px"): ClipTrainConfig(world=WorldConfig(image_size=48))
    with pytest.raises(ValueError, match="batch_size"): ClipTrainConfig(batch_size=1)


def test_cache_key_follows_the_recipe():
    k = config_key(clip_cache_key(CFG))
    assert config_key(clip_cache_key(ClipTrainConfig(vision=VisionTowerConfig(hidden=32, heads=4)))) != k
    assert config_key(clip_cache_key(ClipTrainConfig(epochs=1))) != k


def test_the_vlm_uses_clips_vision_tower():
    "One definition of the tower: the VLM's vision config is 01_clip's, field for field."
    from vlmcourse.world import WorldConfig
    v = VisionTowerConfig(hidden=32, layers=1, heads=2)
    vlm = build_vlm(build_processor(WorldConfig(), LlavaModelConfig(vision=v)), LlavaModelConfig(vision=v))
    ours, theirs = vision_config(v).to_dict(), vlm.config.vision_config.to_dict()
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size"):
        assert theirs[k] == ours[k], k


def test_retrieval_recall():
    sim = torch.eye(5)
    assert retrieval_recall(sim) == {"i2t@1": 1.0, "t2i@1": 1.0, "i2t@5": 1.0, "t2i@5": 1.0}
    shifted = torch.roll(torch.eye(5), 1, dims=1)  # image i is most similar to caption i+1
    r = retrieval_recall(shifted + 0.5 * torch.eye(5), ks=(1, 2))
    assert r["i2t@1"] == 0.0 and r["t2i@1"] == 0.0 and r["i2t@2"] == 1.0
    with pytest.raises(ValueError, match="square"): retrieval_recall(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="k=9"): retrieval_recall(torch.eye(5), ks=(9,))


def test_vision_config_matches_the_vlm():
    mcfg = LlavaModelConfig(vision=CFG.vision)
    vlm = build_vlm(build_processor(CFG.world, mcfg), mcfg)
    theirs, ours = vlm.config.vision_config.to_dict(), clip_config(CFG).vision_config.to_dict()
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
              "hidden_act", "layer_norm_eps", "num_channels"):
        assert theirs[k] == ours[k], k


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    old = os.environ.get("VLMCOURSE_CACHE")
    os.environ["VLMCOURSE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None: del os.environ["VLMCOURSE_CACHE"]
    else: os.environ["VLMCOURSE_CACHE"] = old


def test_training_clamps_the_temperature_and_caches(tiny_cache):
    model = clip_model(TINY, progress=False)
    hist = clip_history(TINY)
    assert len(hist["loss"]) == len(hist["logit_scale"]) == TINY.n_scenes // TINY.batch_size
    assert max(hist["logit_scale"]) <= TINY.max_logit_scale + 1e-6 and model.logit_scale.item() <= TINY.max_logit_scale + 1e-6
    assert hist["logit_scale"][0] == pytest.approx(TINY.max_logit_scale)  # it started above the clip: one step cannot bring it below
    again = clip_model(TINY)
    torch.testing.assert_close(again.logit_scale, model.logit_scale)  # loaded, not retrained


def test_vision_state_dict_loads_into_the_vlm(tiny_cache):
    sd = clip_vision_state_dict(TINY)
    mcfg = LlavaModelConfig(vision=TINY.vision)
    vlm = build_vlm(build_processor(TINY.world, mcfg), mcfg)
    vlm.model.vision_tower.load_state_dict(sd, strict=True)
    assert set(sd) == set(CLIPVisionModel(clip_config(TINY).vision_config).state_dict())
    pix, _ = _inputs(TINY, n=3)
    with torch.no_grad():
        torch.testing.assert_close(vlm.model.vision_tower(pixel_values=pix).last_hidden_state,
                                   clip_model(TINY).vision_model(pixel_values=pix).last_hidden_state)


def test_embeddings_and_zero_shot(tiny_cache):
    model = clip_model(TINY)
    scenes = sample_scenes(TINY.world, 5, seed=9)
    I = embed_images(model, [render(s, TINY.world) for s in scenes], TINY)
    T = embed_texts(model, [caption(s, TINY.world) for s in scenes], TINY)
    assert I.shape == T.shape == (5, TINY.embed_dim)
    torch.testing.assert_close(I.norm(dim=-1), torch.ones(5)); torch.testing.assert_close(T.norm(dim=-1), torch.ones(5))
    prompts = {s: object_prompts(TINY.world, shape=s) for s in TINY.world.shapes}
    mx, mean = zero_shot_scores(model, I, prompts, TINY, "max"), zero_shot_scores(model, I, prompts, TINY, "mean")
    assert mx.shape == mean.shape == (5, len(TINY.world.shapes))
    P = embed_texts(model, prompts["circle"], TINY)
    torch.testing.assert_close(mx[:, 0], (I @ P.T).max(1).values)
    torch.testing.assert_close(mean[:, 0], I @ torch.nn.functional.normalize(P.mean(0), dim=-1))
    assert len(object_prompts(TINY.world, "circle", "red")) == len(TINY.world.positions)
    with pytest.raises(ValueError, match="reduce"): zero_shot_scores(model, I, prompts, TINY, "sum")
    with pytest.raises(ValueError, match="non-empty"): zero_shot_scores(model, I, {"circle": []}, TINY)
