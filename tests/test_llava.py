"The tiny LLaVA: processor round trips, image tokens, save/load, generation, clear errors. No training beyond a few steps."
import json
from dataclasses import replace
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from vlmcourse.world import WorldConfig, sample_scenes, render, caption, CAPTION_PROMPT, cached_artifact
from vlmcourse.llava import (LlavaModelConfig, BaseTrainConfig, build_processor, build_vlm, chat_prompt, sft_batch, generate,
                             describe, save_vlm, load_vlm, train_base, to_rgb, train_loop)

torch.set_num_threads(1)
wcfg, mcfg = WorldConfig(), LlavaModelConfig()

@pytest.fixture(scope="module")
def tiny():
    proc = build_processor(wcfg, mcfg)
    return build_vlm(proc, mcfg, seed=0), proc

def test_processor_roundtrip_and_image_tokens(tiny):
    _, proc = tiny
    s = sample_scenes(wcfg, 1)[0]
    enc = proc(images=[render(s, wcfg)], text=[chat_prompt(proc, CAPTION_PROMPT) + " " + caption(s, wcfg)], return_tensors="pt")
    img_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert (enc["input_ids"] == img_id).sum().item() == (32 // 8) ** 2 == mcfg.num_image_tokens
    text = proc.tokenizer.decode([t for t in enc["input_ids"][0].tolist() if t != img_id])
    assert text.endswith(caption(s, wcfg))
    assert enc["pixel_values"].shape == (1, 3, 32, 32)

def test_sft_labels_cover_only_the_answer(tiny):
    _, proc = tiny
    scenes = sample_scenes(wcfg, 3, seed=4)
    answers = [caption(s, wcfg) for s in scenes]
    b = sft_batch(proc, [render(s, wcfg) for s in scenes], [CAPTION_PROMPT] * 3, answers)
    for i, a in enumerate(answers):
        assert proc.tokenizer.decode(b["labels"][i][b["labels"][i] != -100]) == a + " </s>"
    t = sft_batch(proc, None, ["describe the image ."], ["a red circle at top left ."])
    assert "pixel_values" not in t and proc.tokenizer.decode(t["labels"][0][t["labels"][0] != -100]) == "a red circle at top left . </s>"

def test_save_load_same_logits(tiny, tmp_path):
    model, proc = tiny
    s = sample_scenes(wcfg, 1)[0]
    enc = proc(images=[render(s, wcfg)], text=[chat_prompt(proc, CAPTION_PROMPT)], return_tensors="pt")
    save_vlm(model, proc, tmp_path / "ck")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left behind"
    m2, p2 = load_vlm(tmp_path / "ck", device="cpu")
    with torch.no_grad(): torch.testing.assert_close(m2(**enc).logits, model(**enc).logits)
    assert describe(m2, p2, [render(s, wcfg)], max_new_tokens=6) == describe(model, proc, [render(s, wcfg)], max_new_tokens=6)

def test_generation_batched_equals_single(tiny):
    model, proc = tiny
    imgs = [render(s, wcfg) for s in sample_scenes(wcfg, 5, seed=8)]
    qs = [CAPTION_PROMPT, "is there a circle in the image ?", "where is the square ?", CAPTION_PROMPT, "how many objects are there ?"]
    batched = generate(model, proc, imgs, qs, max_new_tokens=8)
    single = [generate(model, proc, [i], [q], max_new_tokens=8)[0] for i, q in zip(imgs, qs)]
    assert batched == single and all(isinstance(a, str) for a in batched)

def test_image_modes_are_converted(tiny):
    model, proc = tiny
    img = render(sample_scenes(wcfg, 1)[0], wcfg)
    ref = generate(model, proc, [img], CAPTION_PROMPT, max_new_tokens=4)
    for mode in ("L", "RGBA", "P"):
        assert to_rgb(img.convert(mode)).mode == "RGB"
        assert len(generate(model, proc, [img.convert(mode)], CAPTION_PROMPT, max_new_tokens=4)) == 1
    assert generate(model, proc, [img.convert("RGBA")], CAPTION_PROMPT, max_new_tokens=4) == ref

def test_bad_inputs_have_clear_errors(tiny, tmp_path):
    model, proc = tiny
    img = render(sample_scenes(wcfg, 1)[0], wcfg)
    with pytest.raises(ValueError, match="non-empty"): generate(model, proc, [img], "  ")
    with pytest.raises(ValueError, match="2 images but 1 questions"): generate(model, proc, [img, img], ["a ?"])
    with pytest.raises(TypeError, match="PIL image"): generate(model, proc, [np.zeros((32, 32, 3))], "a ?")
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"): load_vlm(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"): load_vlm(tmp_path / "empty")
    save_vlm(model, proc, tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="corrupted"): load_vlm(tmp_path / "ck")
    with pytest.raises(ValueError, match="must divide"): LlavaModelConfig(patch_size=7)

def test_training_reduces_loss():
    tcfg = replace(BaseTrainConfig(), stage1_captions=640, stage2_steps=30)
    model, proc, hist = train_base(tcfg, progress=False)
    assert np.mean(hist["stage1"][-5:]) < np.mean(hist["stage1"][:5])
    assert np.mean(hist["stage2"][-5:]) < np.mean(hist["stage2"][:5])

def test_cache_is_atomic_under_concurrency(tmp_path, monkeypatch):
    "Two processes asking for the same artifact build it once; nobody sees a half-written folder."
    import multiprocessing as mp
    monkeypatch.setenv("VLMCOURSE_CACHE", str(tmp_path))
    ctx = mp.get_context("fork")
    with ctx.Pool(3) as pool: paths = pool.map(_build_slow, range(3))
    assert len(set(paths)) == 1
    assert json.loads((Path(paths[0]) / "count.json").read_text()) == {"built": 1}
    assert len((tmp_path / "builds.log").read_text().splitlines()) == 1

def _build_slow(_):
    import time
    def build(folder):
        with open(Path(folder).parent / "builds.log", "a") as f: f.write("built\n")
        time.sleep(0.5); (folder / "count.json").write_text(json.dumps({"built": 1}))
    return str(cached_artifact("slow", {"k": 1}, build))
