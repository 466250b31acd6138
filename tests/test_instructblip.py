"The tiny InstructBLIP: weight mapping, freezing, the Q-Former's text, batches, a few training steps, save/load, the registry, the exercises."
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tempfile
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionModel, InstructBlipForConditionalGeneration, LlamaConfig
from transformers.models.instructblip.modeling_instructblip import InstructBlipQFormerConfig, InstructBlipQFormerLayer

import solutions as S
from vlmcourse.clip import vision_config
from vlmcourse.exercises import check
from vlmcourse.instructblip import (TASK_FAMILIES, TEMPLATES, InstructBlipModelConfig, build_instructblip_processor, clip_to_blip_vision,
                                    first_match, freeze_for_instruction_tuning, instructblip_answerer, instructblip_batch, instructblip_config,
                                    qformer_inputs, score_reply, task_examples)
from vlmcourse.llava import load_vlm, save_vlm, train_loop
from vlmcourse.registry import model_entry
from vlmcourse.world import WorldConfig, build_tokenizer, render

torch.set_num_threads(1)
WCFG = WorldConfig()


@pytest.fixture(scope="module")
def tiny():
    "A tiny InstructBLIP from configs (random weights, no cache): 2-layer Llama, 2-layer Q-Former, 8 queries."
    proc = build_instructblip_processor(WCFG)
    tok = proc.tokenizer
    txt = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(instructblip_config(proc, txt))
    with torch.no_grad(): model.query_tokens.normal_(0, 0.02)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    return model.eval(), proc


def test_clip_layers_map_exactly_onto_blip_vit(tiny):
    model, _ = tiny
    torch.manual_seed(1)
    clip = CLIPVisionModel(vision_config()).eval()
    vis, extra = clip_to_blip_vision(clip.state_dict())
    assert sorted(extra) == ["pre_layrnorm.bias", "pre_layrnorm.weight"]  # the one CLIP layer BLIP's ViT has no place for
    model.vision_model.load_state_dict(vis, strict=True)
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        e = clip.embeddings(px)
        want = clip(px, output_hidden_states=True).hidden_states[-1]
        got = model.vision_model.encoder(inputs_embeds=clip.pre_layrnorm(e)).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_freeze_counts_and_keeps_frozen_weights(tiny):
    model, proc = tiny
    n = freeze_for_instruction_tuning(model)
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == model.query_tokens.numel() + sum(p.numel() for m in (model.qformer, model.language_projection) for p in m.parameters())
    assert {k.split(".")[0] for k, p in model.named_parameters() if p.requires_grad} == {"query_tokens", "qformer", "language_projection"}
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    trained = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    ex = task_examples(WCFG, 8, seed=0)
    batch = instructblip_batch(proc, [render(e["scene"], WCFG) for e in ex], [e["instruction"] for e in ex], [e["answer"] for e in ex])
    train_loop(model, lambda k: batch, 3, 1e-3, progress=False)
    now = dict(model.named_parameters())
    assert all(torch.equal(v, now[k]) for k, v in frozen.items())
    assert not torch.equal(trained["query_tokens"], now["query_tokens"]) and not torch.equal(trained["language_projection.weight"], now["language_projection.weight"])


def test_qformer_reads_the_instruction_never_the_answer(tiny):
    _, proc = tiny
    ex = task_examples(WCFG, 12, seed=3)
    b = instructblip_batch(proc, [render(e["scene"], WCFG) for e in ex], [e["instruction"] for e in ex], [e["answer"] for e in ex])
    qtok = proc.qformer_tokenizer
    for e, ids, lab in zip(ex, b["qformer_input_ids"], b["labels"]):
        assert qtok.decode(ids, skip_special_tokens=True) == e["instruction"]
        answer_ids = lab[lab != -100].tolist()
        assert proc.tokenizer.decode(answer_ids, skip_special_tokens=True) == e["answer"]
        if e["family"] == "caption": assert len(set(answer_ids) - set(ids.tolist())) > 0  # the caption's words are not in the Q-Former's text
    assert (b["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<image>")).sum(1).tolist() == [proc.num_query_tokens] * 12
    empty = qformer_inputs(proc, ["describe the image ."] * 2, instruction_aware=False)
    assert empty["qformer_input_ids"].shape == (2, 0)


def test_blip2_queries_ignore_the_question_instructblip_queries_do_not(tiny):
    model, proc = tiny
    px = proc.image_processor([render(task_examples(WCFG, 1, seed=0)[0]["scene"], WCFG)] * 2, return_tensors="pt")["pixel_values"]
    qs = ["where is the circle ?", "how many objects are there ?"]
    with torch.no_grad():
        a = model.get_image_features(pixel_values=px, **qformer_inputs(proc, qs, False)).pooler_output
        b = model.get_image_features(pixel_values=px, **qformer_inputs(proc, qs, True)).pooler_output
    torch.testing.assert_close(a[0], a[1])
    assert (b[0] - b[1]).abs().max() > 1e-4


def test_templates_are_in_the_world_words():
    tok = build_tokenizer(WCFG)
    for fam in TASK_FAMILIES:
        for t in TEMPLATES[fam]:
            assert tok.unk_token_id not in tok(t.format(shape="circle"))["input_ids"], t
    fams = {e["family"] for e in task_examples(WCFG, 200, ("caption", "presence"), seed=1)}
    assert fams == {"caption", "presence"}


def test_score_reply():
    assert score_reply("colour", "a red circle at top left .", "red .", WCFG) and not score_reply("colour", "blue red", "red .", WCFG)
    assert score_reply("position", "top left .", "top left .", WCFG) and not score_reply("position", "top right .", "top left .", WCFG)
    assert score_reply("count", "two .", "two .", WCFG) and not score_reply("caption", "a red circle .", "a red circle at top left .", WCFG)
    assert score_reply("presence", "no .", "no .", WCFG) and not score_reply("presence", "yes .", "no .", WCFG)


def test_save_load_with_auto_classes_and_answer(tiny):
    model, proc = tiny
    model.config.instruction_aware = True
    ex = task_examples(WCFG, 3, seed=4)
    imgs, qs = [render(e["scene"], WCFG) for e in ex], [e["instruction"] for e in ex]
    before = instructblip_answerer(model, proc, max_new_tokens=6)(imgs, qs)
    assert len(before) == 3 and all(isinstance(r, str) for r in before)
    with tempfile.TemporaryDirectory() as d:
        save_vlm(model, proc, Path(d) / "ib")
        m2, p2 = load_vlm(Path(d) / "ib", device="cpu")
    assert type(m2).__name__ == "InstructBlipForConditionalGeneration" and m2.config.instruction_aware is True
    assert p2.num_query_tokens == proc.num_query_tokens
    assert instructblip_answerer(m2, p2, max_new_tokens=6)(imgs, qs) == before


def test_registry_entry():
    e = model_entry("instructblip")
    assert e.lesson == "04_instructblip" and e.path_fn == "vlmcourse.instructblip:instructblip_vlm_path"


def test_exercises():
    def layer_params(d, f, dv):
        c = InstructBlipQFormerConfig(hidden_size=d, intermediate_size=f, encoder_hidden_size=dv, num_attention_heads=1, cross_attention_frequency=1)
        return sum(p.numel() for p in InstructBlipQFormerLayer(c, 0).parameters())
    assert check(S.qformer_layer_params, [(64, 128, 64), (768, 3072, 1408), (32, 64, 48)], layer_params)
    assert not check(lambda d, f, dv: 0, [(64, 128, 64)], layer_params)
    cols = WCFG.colours
    assert check(S.first_colour, [("red .", cols), ("a blue square and a red circle .", cols), ("reddish", cols), ("", cols)], first_match)
