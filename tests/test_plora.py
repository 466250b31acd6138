"PLoRA: the layer against eq. 3, the three parity tests (base model, PEFT's LoRA, a fresh adapter), the mask, merge, save and load, bad input."
import copy

import pytest
import torch
from torch import nn
from peft import get_peft_model

from vlmcourse.llava import build_processor, build_vlm, load_vlm, sft_batch, text_prompt, answer_ids, pack_examples, train_loop, generate
from vlmcourse.plora import (PLoRAConfig, PLoRALinear, add_plora, copy_to_peft, load_plora, merge_plora, peft_lora_config,
                             plora_layers, plora_state_dict, prepare_arm, reference_init, save_plora, text_perplexity,
                             trainable_parameters, unmerge_plora, unwrap_plora)
from vlmcourse.world import CAPTION_PROMPT, WorldConfig, caption, render, sample_scenes

WCFG = WorldConfig()


@pytest.fixture(scope="module")
def setup():
    proc = build_processor(WCFG)
    model = build_vlm(proc, seed=0).eval()
    scenes = sample_scenes(WCFG, 4, seed=3)
    batch = sft_batch(proc, [render(s, WCFG) for s in scenes], [CAPTION_PROMPT] * 4, [caption(s, WCFG) for s in scenes])
    tok = proc.tokenizer
    text = pack_examples([(tok(text_prompt(tok, CAPTION_PROMPT))["input_ids"], a) for a in answer_ids(tok, [caption(s, WCFG) for s in scenes])],
                         tok.pad_token_id)
    return proc, model, batch, text


def trained_looking(model, seed=1, std=0.2):
    "A PLoRA copy of `model` whose B is random, so that the adapter changes something."
    pl = add_plora(copy.deepcopy(model)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in plora_layers(pl).values(): m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)
    return pl


def logits(model, batch, **kw):
    with torch.no_grad(): return model(**batch, **kw).logits


# --- the layer ------------------------------------------------------------------------------------------------

def test_layer_is_eq3_by_hand():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(5, 3)
    layer = PLoRALinear(lin, r=2, alpha=6.0, dropout=0.3).eval()
    with torch.no_grad(): layer.lora_B.weight.copy_(torch.randn(3, 2, generator=g))
    x = torch.randn(2, 4, 5, generator=g)
    m = torch.tensor([[True, False, True, False], [False, False, False, True]])
    with torch.no_grad():
        y = layer(x, m)
        want = lin(x) + m[..., None].float() * 3.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-5)
    assert torch.equal(y[~m], lin(x)[~m].detach())
    assert (y[m] - lin(x)[m]).abs().max() > 1e-2


def test_fresh_layer_has_zero_B_and_lora_A_like_peft():
    layer = PLoRALinear(nn.Linear(64, 32), r=4)
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (32, 4)
    assert layer.lora_A.bias is None and layer.lora_B.bias is None
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    assert layer.scaling == pytest.approx(8.0 / 4)


def test_text_positions_exact_in_training_mode_and_no_gradient_from_text():
    layer = PLoRALinear(nn.Linear(4, 4), r=2, dropout=0.5).train()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(1, 6, 4)
    m = torch.tensor([[False, True, False, True, False, False]])
    y = layer(x, m)
    assert torch.equal(y[~m], layer.base(x)[~m])
    layer(x, torch.zeros(1, 6, dtype=torch.bool)).sum().backward()
    assert layer.lora_A.weight.grad is None and layer.lora_B.weight.grad is None


@pytest.mark.parametrize("call, msg", [
    (lambda l, x, m: l(x[0], m[0]), "[B, T, 4]"),
    (lambda l, x, m: l(x, m.float()), "bool tensor"),
    (lambda l, x, m: l(x, m[:, :2]), "im_mask must be [B, T]"),
    (lambda l, x, m: l(x), "no image mask"),
    (lambda l, x, m: l(torch.randn(1, 3, 5), m), "[B, T, 4]"),
])
def test_layer_bad_input(call, msg):
    layer = PLoRALinear(nn.Linear(4, 4), r=2)
    with pytest.raises((ValueError, TypeError), match=msg.replace("[", r"\[").replace("]", r"\]")):
        call(layer, torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool))


@pytest.mark.parametrize("kw, msg", [(dict(r=0), "r must be an integer >= 1"), (dict(r=1.5), "r must be an integer >= 1"),
                                     (dict(alpha=-1), "alpha must be positive"), (dict(dropout=1.0), r"\[0, 1\)")])
def test_layer_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg): PLoRALinear(nn.Linear(4, 4), **kw)
    with pytest.raises(TypeError, match="nn.Linear"): PLoRALinear(nn.Embedding(3, 4))


# --- the model: mask and the three parity tests -----------------------------------------------------------------

def test_mask_reaches_every_layer_in_one_pass(setup):
    proc, model, batch, _ = setup
    pl = add_plora(copy.deepcopy(model))
    seen = {}
    def rec(n):
        def hook(mod, inp, out): seen[n] = mod.im_mask
        return hook
    for n, m in plora_layers(pl).items(): m.register_forward_hook(rec(n))
    logits(pl, batch)
    assert len(seen) == 7 * model.config.text_config.num_hidden_layers
    assert {n.rsplit(".", 1)[1] for n in seen} == set(PLoRAConfig().targets)
    first = next(iter(seen.values()))
    assert all(v is first for v in seen.values())
    assert torch.equal(first, batch["input_ids"] == model.config.image_token_id) and first.sum() == 4 * 17
    assert all(m.im_mask is None for m in plora_layers(pl).values())
    assert not any("vision_tower" in n or "projector" in n for n in plora_layers(pl))


def test_parity_all_text_is_base_model_exactly(setup):
    _, model, batch, _ = setup
    pl = trained_looking(model)
    assert torch.equal(logits(pl, batch, im_mask=torch.zeros_like(batch["input_ids"], dtype=torch.bool)), logits(model, batch))
    assert (logits(pl, batch) - logits(model, batch)).abs().max() > 1e-2  # the adapter is not idle


def test_parity_all_image_is_peft_lora(setup):
    _, model, batch, _ = setup
    pl = trained_looking(model)
    peft = get_peft_model(copy.deepcopy(model), peft_lora_config()).eval()
    assert copy_to_peft(pl, peft) == 14
    ours = logits(pl, batch, im_mask=torch.ones_like(batch["input_ids"], dtype=torch.bool))
    theirs = logits(peft, batch)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (theirs - logits(model, batch)).abs().max() > 1e-2
    assert not any("vision" in n for n, _ in peft.named_parameters() if "lora_" in n)  # PEFT wraps the same layers only


def test_parity_fresh_adapter_is_base_model_exactly(setup):
    _, model, batch, text = setup
    pl = add_plora(copy.deepcopy(model)).eval()
    assert torch.equal(logits(pl, batch), logits(model, batch))
    assert torch.equal(logits(pl, text), logits(model, text))


def test_reference_init_moves_answers_after_images_not_text_only(setup):
    _, model, batch, text = setup
    torch.manual_seed(0)
    ref = reference_init(add_plora(copy.deepcopy(model))).eval()
    assert all(torch.count_nonzero(m.lora_B.weight) > 0 for m in plora_layers(ref).values())
    answers = batch["labels"] >= 0
    assert (logits(ref, batch) - logits(model, batch)).abs().amax(-1)[answers].max() > 1e-2
    assert torch.equal(logits(ref, text), logits(model, text))


def test_generate_with_plora_text_only_positions(setup):
    proc, model, _, _ = setup
    imgs = [render(s, WCFG) for s in sample_scenes(WCFG, 3, seed=5)]
    fresh = add_plora(copy.deepcopy(model))
    assert generate(fresh, proc, imgs, CAPTION_PROMPT, max_new_tokens=6) == generate(model, proc, imgs, CAPTION_PROMPT, max_new_tokens=6)


def test_add_plora_refuses(setup):
    _, model, batch, _ = setup
    pl = add_plora(copy.deepcopy(model))
    with pytest.raises(ValueError, match="already has PLoRA"): add_plora(pl)
    with pytest.raises(ValueError, match="no nn.Linear named"): add_plora(copy.deepcopy(model), PLoRAConfig(targets=("wqkv",)))
    with pytest.raises(TypeError, match="PLoRAConfig"): add_plora(copy.deepcopy(model), dict(r=4))
    with pytest.raises(ValueError, match="pass input_ids, or im_mask"): pl(inputs_embeds=torch.zeros(1, 3, 64))
    with pytest.raises(ValueError, match="im_mask must be"): pl(**batch, im_mask=torch.zeros(1, 2, dtype=torch.bool))


# --- merge, save and load ------------------------------------------------------------------------------------------

def test_merge_keeps_text_exact_and_images_close(setup):
    _, model, batch, text = setup
    pl = trained_looking(model)
    before = logits(pl, batch)
    merged = merge_plora(copy.deepcopy(pl)).eval()
    assert torch.equal(logits(merged, text), logits(model, text))
    torch.testing.assert_close(logits(merged, batch), before, rtol=0, atol=1e-5)
    assert torch.equal(logits(unmerge_plora(merged), batch), before)
    state = plora_state_dict(pl)
    assert all(torch.equal(v, plora_state_dict(merged)[k]) for k, v in state.items())  # merging never changes A and B


def test_save_and_load_beside_base(setup, tmp_path):
    proc, model, batch, _ = setup
    pl = trained_looking(model)
    folder = save_plora(merge_plora(copy.deepcopy(pl)), proc, tmp_path / "plora")  # a merged model saves its adapter unmerged
    assert (folder / "plora_adapter.safetensors").exists() and (folder / "plora_config.json").exists() and (folder / "config.json").exists()
    loaded, _ = load_plora(folder, device="cpu")
    assert torch.equal(logits(loaded, batch), logits(pl, batch))
    base, _ = load_vlm(folder, device="cpu")
    assert torch.equal(logits(base, batch), logits(model, batch))
    assert not plora_layers(unwrap_plora(pl)) and plora_layers(pl)
    with pytest.raises(FileNotFoundError, match="no PLoRA adapter"): load_plora(tmp_path)
    with pytest.raises(ValueError, match="no PLoRA layers"): save_plora(model, proc, tmp_path / "x")


# --- training: PLoRA keeps text, LoRA does not ---------------------------------------------------------------------

def test_training_plora_keeps_text_lora_changes_it(setup):
    proc, model, batch, text = setup
    scenes = sample_scenes(WCFG, 32, seed=7)
    train = sft_batch(proc, [render(s, WCFG) for s in scenes], [CAPTION_PROMPT] * 32, [caption(s, WCFG) for s in scenes])
    out = {}
    for how in ("PLoRA", "LoRA"):
        torch.manual_seed(0)
        m, groups = prepare_arm(copy.deepcopy(model).requires_grad_(True), how)
        n = trainable_parameters(m)
        train_loop(m, lambda k: train, 5, 3e-3, params=groups, progress=False)
        out[how] = (n, m)
    assert out["PLoRA"][0] == out["LoRA"][0]
    assert torch.equal(logits(out["PLoRA"][1], text), logits(model, text))
    assert (logits(out["LoRA"][1], text) - logits(model, text)).abs().max() > 1e-3
    assert (logits(out["PLoRA"][1], batch) - logits(model, batch)).abs().max() > 1e-3  # PLoRA did learn something
    assert text_perplexity(out["PLoRA"][1], proc, WCFG, n=64) == text_perplexity(model, proc, WCFG, n=64)
    with pytest.raises(ValueError, match="how must be one of"): prepare_arm(copy.deepcopy(model), "qlora")
