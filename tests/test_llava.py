"The tiny LLaVA: processor round trips, image tokens, save/load, generation, clear errors. No training beyond a few steps."
import json
from dataclasses import replace
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from vlmcourse.cache import cached_artifact
from vlmcourse.world import WorldConfig, sample_scenes, render, caption, CAPTION_PROMPT
from vlmcourse.world import is_typical
from helpers import TINY_TEXT
from vlmcourse.clip import VisionTowerConfig, to_rgb
from vlmcourse.llava import (LlavaModelConfig, BaseTrainConfig, AlignmentBatches, build_processor, build_vlm, chat_prompt, sft_batch,
                             generate, describe, save_vlm, load_vlm, train_base, train_loop, stage2_examples, oracle_config,
                             answer_ids)

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
    assert (enc["input_ids"] == img_id).sum().item() == (32 // 8) ** 2 + 1 == mcfg.num_image_tokens  # 16 patches and CLS
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

class _MarksImageTokens:
    "A processor that also returns one value per prompt token, as Qwen2-VL's does (`mm_token_type_ids`: 1 on image tokens)."
    def __init__(self, proc): self.proc = proc
    def __getattr__(self, name): return getattr(self.proc, name)
    def __call__(self, *args, **kwargs):
        enc = self.proc(*args, **kwargs)
        enc["mm_token_type_ids"] = (enc["input_ids"] == self.proc.tokenizer.convert_tokens_to_ids("<image>")).long()
        return enc

def test_sft_batch_extends_per_token_fields_over_the_answer(tiny):
    _, proc = tiny
    scenes = sample_scenes(wcfg, 3, seed=4)
    answers = ["a red circle at top left .", caption(scenes[1], wcfg), "yes ."]  # answers of different lengths: right padding differs
    b = sft_batch(_MarksImageTokens(proc), [render(s, wcfg) for s in scenes], [CAPTION_PROMPT] * 3, answers)
    img_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert b["mm_token_type_ids"].shape == b["input_ids"].shape  # the prompt's field, over prompt, answer and padding
    assert torch.equal(b["mm_token_type_ids"], (b["input_ids"] == img_id).long())  # 1 exactly on the image tokens, 0 on the answer

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
    with pytest.raises(ValueError, match="must divide"): VisionTowerConfig(patch_size=7)

def test_training_reduces_loss():
    tcfg = replace(BaseTrainConfig(), stage1_captions=640, stage2_steps=30, **TINY_TEXT)
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


def test_sft_labels_with_a_bpe_tokenizer():
    "With a BPE tokenizer (merges across a word boundary are possible), the labels are exactly the answer's tokens."
    from types import SimpleNamespace
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from vlmcourse.world import CHAT_TEMPLATE
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [caption(s, wcfg) for s in sample_scenes(wcfg, 200, seed=3)] + ["user : describe the image . assistant : yes . no ."]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", chat_template=CHAT_TEMPLATE)
    answers = ["a red circle at top left .", "yes ."]
    b = sft_batch(SimpleNamespace(tokenizer=tok), None, [CAPTION_PROMPT, "is there a circle in the image ?"], answers)
    for i, a in enumerate(answers):
        lab = b["labels"][i][b["labels"][i] != -100].tolist()
        assert lab == answer_ids(tok, [a])[0]
        assert tok.decode(lab, skip_special_tokens=True).strip() == a and lab[-1] == tok.eos_token_id
        n = int(b["attention_mask"][i].sum())
        assert b["input_ids"][i, n - len(lab):n].tolist() == lab  # the answer closes the row, right before the padding

def test_alignment_batches_equal_sft_batch(tiny):
    _, proc = tiny
    ex = stage2_examples(BaseTrainConfig(), 12, seed=5)
    ds = AlignmentBatches(proc, wcfg, ex, batch_size=4)
    assert len(ds) == 3
    for k in range(3):
        chunk = ex[4 * k:4 * k + 4]
        plain = sft_batch(proc, [render(s, wcfg) for s, _, _ in chunk], [q for _, q, _ in chunk], [a for _, _, a in chunk])
        assert set(plain) == set(ds[k]) and all(torch.equal(ds[k][n], plain[n]) for n in plain)

def test_stage2_mix_and_the_alignment_prior():
    ex = stage2_examples(BaseTrainConfig(), 2000, seed=1)
    assert all(is_typical(s, wcfg) for s, _, _ in ex)  # align_prior=1.0: the alignment data never break the prior
    qs = [q for _, q, _ in ex]
    assert 0.35 < np.mean([q == CAPTION_PROMPT for q in qs]) < 0.45 and 0.35 < np.mean([q.startswith("is there") for q in qs]) < 0.45
    presence = [a for _, q, a in ex if q.startswith("is there")]
    assert 0.4 < np.mean([a == "yes ." for a in presence]) < 0.6  # as many no as yes
    loose = stage2_examples(replace(BaseTrainConfig(), align_prior=0.5), 2000, seed=1)
    assert not all(is_typical(s, wcfg) for s, _, _ in loose)
    with pytest.raises(ValueError, match="align_prior"): BaseTrainConfig(align_prior=1.5)
    with pytest.raises(ValueError, match="caption_frac"): BaseTrainConfig(caption_frac=0.7, presence_frac=0.5)

def test_oracle_world_has_no_prior():
    o = oracle_config()
    assert o.world.partners == () and replace(o, world=BaseTrainConfig().world) == BaseTrainConfig()
    ex = stage2_examples(o, 3000, seed=0)
    alone = [s for s, _, _ in ex if "circle" in s.shapes and "square" not in s.shapes]
    assert len(alone) > 100  # circles without squares are common in the oracle's data

def test_train_loop_parameter_groups(tiny):
    "A parameter group with learning rate 0 does not move; the other does."
    model, proc = tiny
    import copy
    m = copy.deepcopy(model)
    s = sample_scenes(wcfg, 4, seed=2)
    b = sft_batch(proc, [render(x, wcfg) for x in s], [CAPTION_PROMPT] * 4, [caption(x, wcfg) for x in s])
    lm = list(m.model.language_model.parameters())
    frozen = [p.detach().clone() for p in lm]
    ids = {id(p) for p in lm}
    train_loop(m, lambda k: b, 3, 1e-2, params=[{"params": lm, "lr": 0.0}, {"params": [p for p in m.parameters() if id(p) not in ids]}], progress=False)
    assert all(torch.equal(a, p) for a, p in zip(frozen, lm))
    assert not torch.equal(m.model.multi_modal_projector.linear_1.weight, model.model.multi_modal_projector.linear_1.weight)

def test_train_base_restores_thread_count():
    before = torch.get_num_threads()
    train_base(replace(BaseTrainConfig(), stage1_captions=64, stage2_steps=2, batch_size=8, clip_init=False, **TINY_TEXT), progress=False, threads=2, workers=0)
    assert torch.get_num_threads() == before

def test_base_vlm_tries_the_next_seed_until_one_tells_the_story(tmp_path, monkeypatch):
    "A tiny model passes no check: base_vlm_path and oracle_vlm_path train seed_tries seeds, record each, keep the last."
    from vlmcourse.llava import base_vlm_path, oracle_vlm_path, tells_the_story, reads_the_world
    monkeypatch.setenv("VLMCOURSE_CACHE", str(tmp_path))
    tcfg = BaseTrainConfig(stage1_captions=64, stage2_steps=3, batch_size=8, clip_init=False, seed_tries=2, seed=5, **TINY_TEXT)
    tries = json.loads((base_vlm_path(tcfg, progress=False) / "history.json").read_text())["tries"]
    assert [t["seed"] for t in tries] == [5, 6] and not any(t["passes"] for t in tries)
    oracle_tries = json.loads((oracle_vlm_path(tcfg, progress=False) / "history.json").read_text())["tries"]
    assert [t["seed"] for t in oracle_tries] == [5, 6]  # the oracle's check (competence) fails too
    good = {"typical exact": 1.0, "typical presence": 1.0, "counter presence": 0.6, "counter hallucinated": 0.4}
    assert tells_the_story(good)
    assert not tells_the_story(good | {"counter hallucinated": 0.1}) and not tells_the_story(good | {"counter presence": 0.95})
    assert reads_the_world(good) and not reads_the_world(good | {"typical exact": 0.5})


def test_the_two_stages_are_train_base():
    "text_stage then align_stage is train_base, step for step, so later lessons can start from the text stage."
    from vlmcourse.llava import align_stage, text_stage
    t = BaseTrainConfig(stage1_captions=64, stage2_steps=3, batch_size=8, clip_init=False, **TINY_TEXT)
    torch.set_num_threads(1)
    _, _, hist = train_base(t, progress=False)
    model, proc, s1 = text_stage(t, progress=False)
    s2 = align_stage(model, proc, t, progress=False)
    assert s1 == hist["stage1"] and s2 == hist["stage2"]
    assert len(align_stage(model, proc, t, progress=False, steps=2, loss_fn=lambda m, b: m(**b).loss * 0)) == 2


def test_phase_point_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    import vlmcourse.llava as L
    monkeypatch.setenv("VLMCOURSE_CACHE", str(tmp_path))
    trained = []
    def fake_train(t, progress=True):  # an untrained model: this checks the caching, not the training
        trained.append(t)
        proc = L.build_processor(t.world, t.model)
        return L.build_vlm(proc, t.model, seed=0), proc, {}
    monkeypatch.setattr(L, "train_base", fake_train)
    a = L.phase_point(1.0, 0.05, seed=0, stage2_steps=4, n=3)
    b = L.phase_point(1.0, 0.05, seed=0, stage2_steps=4, n=3)
    c = L.phase_point(0.9, 0.05, seed=0, stage2_steps=4, n=3)
    assert a == b and len(trained) == 2  # the second call read the first's point; another cell trained its own
    assert trained[0].stage1_captions == max(trained[0].batch_size, round(0.05 * 4 * trained[0].batch_size))
    assert set(a) == {"align_prior", "stage1_ratio", "seed", "counter_chair_s", "typical_exact"} and c["align_prior"] == 0.9
    assert 0 <= a["counter_chair_s"] <= 1 and 0 <= a["typical_exact"] <= 1


def test_stage0_data():
    "Copying pairs repeat a random sequence of ordinary words; lookups answer a colour or a position after the caption."
    from vlmcourse.llava import copy_examples, lookup_examples
    from vlmcourse.world import final_answer, questions
    w = WorldConfig()
    tok = build_processor(w).tokenizer
    ex = copy_examples(tok, 50, seed=0)
    assert all(p == a and 5 <= len(p) <= 10 for p, a in ex) and len({tuple(p) for p, _ in ex}) == 50
    assert not set(tok.all_special_ids) & {i for p, _ in ex for i in p}
    assert ex == copy_examples(tok, 50, seed=0) and ex != copy_examples(tok, 50, seed=1)
    look = lookup_examples(w, 40, seed=3)
    scenes = sample_scenes(w, 40, seed=3)
    assert {q.split()[0] for q, _ in look} == {"what", "where"}  # both kinds
    for (q, a), s in zip(look, scenes):
        assert a.startswith(caption(s, w) + " the ")  # the caption first
        shape = q.split()[-2]
        o = next(o for o in s.objects if o.shape == shape)
        assert final_answer(a) == (f"{o.colour} ." if q.startswith("what") else f"{w.positions[o.cell]} .")
    with pytest.raises(ValueError, match="copy_steps"): BaseTrainConfig(lookup_steps=-1)


def test_stage2_answers_describe_first():
    from vlmcourse.llava import stage2_examples
    from vlmcourse.world import final_answer
    t = BaseTrainConfig()
    long, short = stage2_examples(t, 300, seed=4), stage2_examples(replace(t, describe_first=False), 300, seed=4)
    assert [(s, q) for s, q, _ in long] == [(s, q) for s, q, _ in short]  # the same scenes and questions
    asks = [q.startswith(("what colour", "where is")) for _, q, _ in short]
    assert 20 < sum(asks) < 100
    for (s, q, a), (_, _, b), ask in zip(long, short, asks):
        assert (a == f"{caption(s, t.world)} the {q.split()[-2]} is {'at ' if q.startswith('where') else ''}{b}") if ask else a == b
        assert final_answer(a) == b


def test_base_vlm_keeps_its_text_stage(tmp_path, monkeypatch):
    "Training the base model caches the model after stages 0 and 1, the one text_stage_vlm would train."
    import vlmcourse.llava as L
    monkeypatch.setenv("VLMCOURSE_CACHE", str(tmp_path))
    t = BaseTrainConfig(stage1_captions=64, stage2_steps=2, batch_size=8, clip_init=False, seed_tries=1, **TINY_TEXT)
    torch.set_num_threads(1)
    L.base_vlm_path(t, progress=False)
    model, _, _ = L.text_stage(t, progress=False)
    monkeypatch.setattr(L, "text_stage", lambda *a, **k: pytest.fail("the text stage was trained again"))
    kept, _ = L.text_stage_vlm(t, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), kept.state_dict().values()))
