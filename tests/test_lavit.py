"LaVIT: vector_quantize's three properties, the masked attention against PyTorch's, the tokenizer's shapes and gradients, the LM's sequences, save and load, bad input."
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlmcourse.lavit import (DynamicVisualTokenizer, LavitConfig, LavitProcessor, VisualTokenizerConfig, add_code_tokens, answerer,
                             codebook_usage, lavit_batch, load_lavit, load_visual_tokenizer, masked_attention, objects_per_patch,
                             save_lavit, save_visual_tokenizer, vector_quantize)
from vlmcourse.world import WorldConfig, build_tokenizer, sample_scenes

G = torch.Generator().manual_seed(0)


def vq_inputs(n=32, k=8, d=6):
    return torch.randn(n, d, generator=G, requires_grad=True), torch.randn(k, d, generator=G, requires_grad=True)


def test_forward_is_the_nearest_code_exactly():
    z, cb = vq_inputs()
    z_q, ids, _ = vector_quantize(z, cb)
    assert torch.equal(z_q, cb[ids].detach())
    assert torch.equal(ids, torch.cdist(z.detach(), cb.detach()).argmin(1))


def test_gradient_passes_straight_through_to_z():
    z, cb = vq_inputs()
    z_q, _, _ = vector_quantize(z, cb)
    g = torch.randn_like(z)
    gz, gc = torch.autograd.grad(z_q, (z, cb), g, allow_unused=True)
    assert torch.equal(gz, g)
    assert gc is None  # nothing from z_q reaches the codebook


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
def test_loss_is_codebook_term_plus_beta_commitment(beta):
    z, cb = vq_inputs()
    _, ids, loss = vector_quantize(z, cb, beta=beta)
    e = cb[ids].detach()
    torch.testing.assert_close(loss, (1 + beta) * ((z - e) ** 2).mean())
    gz, gc = torch.autograd.grad(loss, (z, cb))
    torch.testing.assert_close(gz, beta * 2 * (z - e).detach() / z.numel())  # commitment term only, weighted by beta
    torch.testing.assert_close(gc, torch.zeros_like(cb).index_add_(0, ids, 2 * (e - z).detach() / z.numel()))  # codebook term only


def test_vector_quantize_refuses_bad_input():
    z, cb = vq_inputs()
    for bad, msg in (((z[0], cb), "z must be 2-D"), ((z, cb[:, :3]), "must match"), ((z[:0], cb), "at least one row"),
                     ((z, cb.long()), "floating-point")):
        with pytest.raises((ValueError, TypeError), match=msg): vector_quantize(*bad)
    with pytest.raises(ValueError, match="beta must be >= 0"): vector_quantize(z, cb, beta=-0.1)


def test_masked_attention_is_attention_over_the_allowed_keys_and_passes_gradient_to_the_mask():
    q, k, v = (torch.randn(2, 4, 5, 8, generator=G) for _ in range(3))
    w = (torch.rand(2, 5, generator=G) > 0.5).float()
    w[:, 0] = 1
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=w.bool()[:, None, None, :])
    torch.testing.assert_close(masked_attention(q, k, v, w), ref, atol=1e-5, rtol=1e-5)
    w.requires_grad_(True)
    masked_attention(q, k, v, w).sum().backward()
    assert w.grad.abs().sum() > 0


def test_tokenizer_shapes_hard_mask_and_gradient_to_selector():
    vt = DynamicVisualTokenizer(VisualTokenizerConfig(codebook_size=16)).train()
    f = torch.randn(4, 16, 64, generator=G)
    out = vt(f)
    assert out["rec"].shape == (4, 16, 64) and set(out["keep"].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal((out["ids"] >= 0).float(), out["keep"].detach())
    (1 - F.cosine_similarity(out["rec"], f, dim=-1)).mean().backward()
    assert vt.selector[-1].weight.grad.abs().sum() > 0
    vt.eval()
    codes = vt.tokenize(f)
    assert all(1 <= len(c) <= 16 and all(0 <= x < 16 for x in c) for c in codes)
    with pytest.raises(ValueError, match=r"feats must be \[B, 16, 64\]"): vt(f[:, :8])


def test_codebook_usage_and_object_patches():
    u = codebook_usage(torch.tensor([0, 1, 2, 3, -1]), 8)
    assert abs(u["perplexity"] - 4) < 1e-9 and u["dead codes"] == 4
    assert codebook_usage(torch.tensor([3, 3, 3]), 4)["perplexity"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no codes"): codebook_usage(torch.tensor([-1, -1]), 4)
    w = WorldConfig()
    s = sample_scenes(w, 20, seed=0)
    m = objects_per_patch(s, w)
    assert m.shape == (20, 16) and (m.sum(1) == torch.tensor([4 * len(x.objects) for x in s])).all()


def test_config_refuses_another_clip():
    from dataclasses import replace
    from vlmcourse.clip import ClipTrainConfig
    with pytest.raises(ValueError, match="base recipe's CLIP"):
        LavitConfig(tokenizer=VisualTokenizerConfig(clip=ClipTrainConfig(epochs=1)))
    with pytest.raises(ValueError, match="keep_ratio"): VisualTokenizerConfig(keep_ratio=0)
    with pytest.raises(ValueError, match="continuous_steps"): VisualTokenizerConfig(continuous_steps=10, steps=10)


@pytest.fixture(scope="module")
def tiny_lavit():
    "An untrained tokenizer and LM (a fresh Llama from the text config), enough for sequences, generation, save and load."
    from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    from vlmcourse.clip import vision_config
    cfg = VisualTokenizerConfig(codebook_size=16)
    tok = build_tokenizer(WorldConfig())
    add_code_tokens(tok, 16)
    torch.manual_seed(0)
    proc = LavitProcessor(CLIPVisionModel(vision_config(cfg.clip.vision)), DynamicVisualTokenizer(cfg), tok)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id, bos_token_id=None)).eval()
    return lm, proc


def test_sequences_put_the_codes_after_the_image_marker_and_score_them(tiny_lavit):
    _, proc = tiny_lavit
    pre, vis, post = proc.prompt_ids("describe the image .", [3, 0, 15])
    tok = proc.tokenizer
    assert tok.convert_ids_to_tokens(pre)[-1] == "<image>" and tok.convert_ids_to_tokens(vis) == ["<code3>", "<code0>", "<code15>"]
    assert tok.decode(post).strip().endswith("assistant :")
    ans = tok([" yes . </s>"], add_special_tokens=False)["input_ids"][0]
    b = lavit_batch([(pre, vis, post, ans)], tok.pad_token_id, image_loss=True)
    lab = b["labels"][0].tolist()
    assert lab[len(pre):len(pre) + 3] == vis and lab[-len(ans):] == ans and set(lab[:len(pre)] + lab[len(pre) + 3:-len(ans)]) == {-100}
    b2 = lavit_batch([(pre, vis, post, ans)], tok.pad_token_id, image_loss=False)
    assert (b2["labels"][0, :-len(ans)] == -100).all()


def test_generation_save_and_load_round_trip(tiny_lavit):
    from vlmcourse.world import render
    lm, proc = tiny_lavit
    w = WorldConfig()
    ims = [render(s, w) for s in sample_scenes(w, 3, seed=1)]
    replies = answerer(lm, proc, max_new_tokens=5)(ims, ["is there a circle in the image ?"] * 3)
    assert len(replies) == 3 and not any("<code" in r for r in replies)  # codes are never generated
    with tempfile.TemporaryDirectory() as d:
        p = save_lavit(lm, proc, Path(d) / "m")
        lm2, proc2 = load_lavit(p, device="cpu")
        assert answerer(lm2, proc2, max_new_tokens=5)(ims, ["is there a circle in the image ?"] * 3) == replies
        with pytest.raises(ValueError, match="no LaVIT checkpoint"): load_lavit(Path(d) / "nothing")
        with pytest.raises(ValueError, match="no visual tokenizer"): load_visual_tokenizer(Path(d) / "nothing")
        (p / "visual" / "visual_tokenizer.pt").write_bytes(b"junk")
        with pytest.raises(ValueError, match="corrupted or incomplete"): load_lavit(p, device="cpu")
    with pytest.raises(ValueError, match="2 images but 1 questions"): answerer(lm, proc)(ims[:2], ["describe the image ."])
    with pytest.raises(ValueError, match="non-empty string"): answerer(lm, proc)(ims[:1], [" "])


def test_registered_with_its_own_loader_and_answerer():
    from vlmcourse.registry import model_entry
    e = model_entry("lavit")
    assert e.loader == "vlmcourse.lavit:load_lavit" and e.answerer == "vlmcourse.lavit:answerer" and e.lesson == "11_lavit"
