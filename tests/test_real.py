"Real architectures, tiny and offline (14_real_models): the course's functions on LLaVA-1.5's, SmolVLM's and InstructBLIP's classes, POPE and CHAIR files, and `vlmcourse align`."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import copy, json, math, tempfile

import pytest
import torch
from transformers.trainer_callback import PrinterCallback

from vlmcourse.world import CAPTION_PROMPT, WorldConfig, caption, render, sample_scenes
from vlmcourse.llava import answerer, generate, load_vlm, sft_batch, split_exchange, train_loop
from vlmcourse.dpo import DPOTrainConfig, dpo_loss, for_trl, preference_dataset, sequence_logps, trl_dpo_config, unpack_pairs
from vlmcourse.hallucination import evaluate_captions, evaluate_pope
from vlmcourse.real import (ARCHS, HUB_IDS, chair_coco, coco_mentions, load_pairs, read_jsonl, save_tiny_vlm, score_pope_files,
                            answer_pope_file, tiny_vlm, tiny_processor)

WCFG = WorldConfig()
BUILT = ("llava", "idefics3", "instructblip")  # Qwen2-VL's processor needs torchvision in transformers 5.24 (see test_qwen2_vl_needs_torchvision)
SCENES = sample_scenes(WCFG, 4, seed=1, kind="counter")
IMAGES = [render(s, WCFG) for s in SCENES]


@pytest.fixture(scope="module", params=BUILT)
def tiny(request, tmp_path_factory):
    folder = save_tiny_vlm(request.param, tmp_path_factory.mktemp(request.param) / "ckpt")
    model, proc = load_vlm(folder, device="cpu")
    return request.param, folder, model, proc


def test_real_classes(tiny):
    arch, folder, model, proc = tiny
    want = {"llava": ("LlavaForConditionalGeneration", "LlavaProcessor"), "idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor"),
            "instructblip": ("InstructBlipForConditionalGeneration", "InstructBlipProcessor")}[arch]
    assert (type(model).__name__, type(proc).__name__) == want
    assert proc.chat_template and sum(p.numel() for p in model.parameters()) < 400_000
    assert set(HUB_IDS) == set(ARCHS)


def test_generate_answers_a_batch(tiny):
    _, _, model, proc = tiny
    qs = [CAPTION_PROMPT, "is there a circle ?", "what colour is the square ?", "is there a star ?"]
    out = generate(model, proc, IMAGES, qs, max_new_tokens=6)
    assert len(out) == 4 and all(isinstance(o, str) for o in out)
    assert generate(model, proc, IMAGES[:1], qs[:1], max_new_tokens=6) == generate(model, proc, IMAGES[:1], qs[:1], max_new_tokens=6)


def test_sft_labels_cover_exactly_the_answer(tiny):
    arch, _, model, proc = tiny
    qs, ans = [CAPTION_PROMPT, "is there a circle ?", CAPTION_PROMPT, "what colour ?"], [caption(s, WCFG) for s in SCENES]
    b = sft_batch(proc, IMAGES, qs, ans)
    eot = {"llava": "</s>", "idefics3": "<end_of_utterance>", "instructblip": "</s>"}[arch]
    for r, (q, a) in enumerate(zip(qs, ans)):
        prompt, completion = split_exchange(proc, q, a)
        assert completion.strip().startswith(a) and eot in completion  # the answer and the family's end of turn
        n_prompt = len(proc(text=[prompt], images=[IMAGES[r]], return_tensors="pt")["input_ids"][0])
        answer_ids = proc.tokenizer(completion, add_special_tokens=False)["input_ids"]
        mask = torch.zeros(b["labels"].shape[1], dtype=torch.bool)
        mask[n_prompt:n_prompt + len(answer_ids)] = True
        assert torch.equal(b["labels"][r] != -100, mask)
        assert b["labels"][r][mask].tolist() == answer_ids
        assert b["input_ids"][r][:n_prompt + len(answer_ids)][mask[:n_prompt + len(answer_ids)]].tolist() == answer_ids
    with torch.no_grad():  # the summed log-probabilities are the model's own mean loss times the number of answer tokens
        lp, own = sequence_logps(model, b), model(**b).loss
    assert (-lp.sum() / (b["labels"][:, 1:] != -100).sum()).item() == pytest.approx(own.item(), abs=1e-5)


def make_pairs(same_question):
    qs = [CAPTION_PROMPT] * 4 if same_question else [CAPTION_PROMPT, "is there a circle ?", CAPTION_PROMPT, "what colour ?"]
    others = sample_scenes(WCFG, 4, seed=9)
    return preference_dataset(IMAGES, qs, [caption(s, WCFG) for s in SCENES], [caption(o, WCFG) for o in others])


def test_trl_collator_scores_the_same_tokens(tiny):
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
    arch, _, model, proc = tiny
    pairs = make_pairs(same_question=arch == "instructblip")
    imgs, qs, cs, rs = unpack_pairs(pairs)
    ours = sft_batch(proc, imgs * 2, qs * 2, cs + rs)
    theirs = DataCollatorForVisionPreference(processor=proc)([dict(r) for r in for_trl(pairs, proc)])
    for r in range(8):  # TRL pads prompts on the left, then flushes left: compare the real tokens and the scored ones
        t = theirs["input_ids"][r][theirs["attention_mask"][r].bool()].tolist()
        o = ours["input_ids"][r][ours["attention_mask"][r].bool()].tolist()
        assert t == o
        assert theirs["input_ids"][r][theirs["completion_mask"][r].bool()].tolist() == ours["labels"][r][ours["labels"][r] != -100].tolist()


def policy_and_whole_sequence_loss(ref, proc, pairs):
    "The reference after five SFT steps on the chosen answers, and the DPO loss of its whole-sequence log-probs against `ref`."
    imgs, qs, cs, rs = unpack_pairs(pairs)
    policy = copy.deepcopy(ref)
    train_loop(policy, lambda k: sft_batch(proc, imgs, qs, cs), 5, 3e-3, progress=False)
    b = sft_batch(proc, imgs * 2, qs * 2, cs + rs)
    with torch.no_grad():
        (pc, pr), (rc, rr) = sequence_logps(policy, b).chunk(2), sequence_logps(ref, b).chunk(2)
    return policy, dpo_loss(pc, pr, rc, rr)[0].mean().item()


@pytest.mark.parametrize("same_question", [True, False])
def test_sequence_logps_parity_with_trl(tiny, same_question):
    from trl import DPOTrainer
    arch, _, ref, proc = tiny
    if arch == "instructblip":
        pytest.skip("TRL 1.16's DPOTrainer cannot run InstructBLIP: its fused LM head reads `last_hidden_state`, which InstructBLIP's output lacks")
    pairs = make_pairs(same_question)
    policy, ours = policy_and_whole_sequence_loss(ref, proc, pairs)
    with tempfile.TemporaryDirectory() as d:
        tr = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), train_dataset=for_trl(pairs, proc), processing_class=proc,
                        args=trl_dpo_config(DPOTrainConfig(), d, max_steps=1, per_device_train_batch_size=4))
        tr.remove_callback(PrinterCallback)
        tr.train()
    assert ours == pytest.approx(tr.state.log_history[0]["loss"], abs=1e-5)
    assert abs(ours - math.log(2)) > 0.01  # the policy is not the reference


def test_dpo_train_first_step_equals_sequence_logps_on_each_architecture(tiny, monkeypatch):
    "dpo_train's first step (one shared prefix on LLaVA's class, whole sequences elsewhere) is the loss of whole-sequence log-probs."
    import vlmcourse.dpo as dpo
    arch, _, ref, proc = tiny
    pairs = make_pairs(False)
    policy, want = policy_and_whole_sequence_loss(ref, proc, pairs)
    cfg = DPOTrainConfig(batch_size=len(pairs), epochs=1)
    got = dpo.dpo_train(copy.deepcopy(policy), proc, pairs, cfg, ref_model=ref, progress=False)["loss"][0]
    assert got == pytest.approx(want, abs=1e-4), arch
    if arch == "llava":  # the shared prefix applies here: the same pairs scored whole give the same step
        monkeypatch.setattr(dpo, "_shares_prefix", lambda m: False)
        assert dpo.dpo_train(copy.deepcopy(policy), proc, pairs, cfg, ref_model=ref, progress=False)["loss"][0] == pytest.approx(got, abs=1e-4)


def test_pair_builders_and_yardstick(tiny):
    from vlmcourse.pairs import build_pairs
    arch, _, model, proc = tiny
    ds = build_pairs(model, proc, WCFG, "bpo_inject", n=4, progress=False)
    assert len(ds) == 4 and len(sft_batch(proc, *unpack_pairs(ds)[:3])["input_ids"]) == 4
    if arch != "instructblip":  # 06_pairs' `decode` passes no qformer_input_ids: the model-decoded sources do not run on InstructBLIP
        assert len(build_pairs(model, proc, WCFG, "seva", n=2, progress=False, pcfg=__import__("vlmcourse.pairs", fromlist=["PairConfig"]).PairConfig(max_rounds=3))) == 2
    r = evaluate_captions(answerer(model, proc, max_new_tokens=8), SCENES[:2], WCFG)
    p = evaluate_pope(answerer(model, proc, max_new_tokens=3), SCENES[:2], WCFG, "adversarial")
    assert 0 <= r["chair_s"] <= 1 and 0 <= p["accuracy"] <= 1


def test_demo_loads_it_on_either_side(tiny, tmp_path):
    from vlmcourse.demo import SideBySide
    arch, folder, model, proc = tiny
    other = save_tiny_vlm("llava", tmp_path / "llava")
    for left, right in ((str(folder), str(other)), (str(other), str(folder))):
        sbs = SideBySide(left=left, right=right)
        segs_l, segs_r, verdict = sbs.ask(None, SCENES[0].to_dict(), CAPTION_PROMPT)
        assert "left" in verdict and "right" in verdict
        table, _ = sbs.probe(None, SCENES[0].to_dict())
        assert len(table) == len(WCFG.shapes)


def test_qwen2_vl_needs_torchvision():
    import importlib.util
    if importlib.util.find_spec("torchvision") is not None: pytest.skip("torchvision is installed")
    with pytest.raises(ImportError, match="torchvision"):
        tiny_processor("qwen2_vl")
    with pytest.raises(ValueError, match="unknown architecture"):
        tiny_vlm("llama")


# --- POPE and CHAIR files ---------------------------------------------------------------------------------------

def test_pope_files(tmp_path):
    qs = [{"question_id": 1, "image": "a.png", "text": "Is there a circle in the image?", "label": "yes"},
          {"question_id": 2, "image": "a.png", "text": "Is there a star in the image?", "label": "no"},
          {"question_id": 3, "image": "b.png", "text": "Is there a square in the image?", "label": "no"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    (tmp_path / "a.jsonl").write_text('{"question_id": 3, "text": "Yes. It is not red."}\n{"question_id": 1, "text": "Yes, there is."}\n{"question_id": 2, "text": "No, there is not."}\n')
    m = score_pope_files(tmp_path / "q.jsonl", tmp_path / "a.jsonl")  # strict: 'not' after the first sentence does not count
    assert (m["accuracy"], m["precision"], m["recall"], m["yes_ratio"]) == pytest.approx((2 / 3, 0.5, 1.0, 2 / 3))
    (tmp_path / "short.jsonl").write_text('{"question_id": 1, "text": "Yes"}\n')
    with pytest.raises(ValueError, match="no answer to 2 questions"):
        score_pope_files(tmp_path / "q.jsonl", tmp_path / "short.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1, "image": "a.png", "text": "q", "label": "maybe"}\n')
    with pytest.raises(ValueError, match="label"):
        score_pope_files(tmp_path / "bad.jsonl", tmp_path / "a.jsonl")
    render(SCENES[0], WCFG).save(tmp_path / "a.png"); render(SCENES[1], WCFG).save(tmp_path / "b.png")
    answer_pope_file(lambda images, questions: ["No." if "star" in q else "Yes." for q in questions], tmp_path / "q.jsonl", tmp_path, tmp_path / "out.jsonl")
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [set(r) for r in rows] == [{"question_id", "image", "text"}] * 3 and rows[1]["text"] == "No."
    assert score_pope_files(tmp_path / "q.jsonl", tmp_path / "out.jsonl")["accuracy"] == pytest.approx(2 / 3)


def test_coco_chair(tmp_path):
    assert coco_mentions("Two men and a woman ride bikes past a hot dog stand.") == ["person", "bicycle", "hot dog"]
    assert coco_mentions("A baby elephant walks beside puppies and a teddy bear.") == ["elephant", "dog", "teddy bear"]
    assert coco_mentions("People on motorbikes near a fire hydrant.") == ["person", "motorcycle", "fire hydrant"]
    inst = {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 3, "name": "car"}],
            "annotations": [{"image_id": 1, "category_id": 1}, {"image_id": 1, "category_id": 18}, {"image_id": 2, "category_id": 3}]}
    (tmp_path / "instances.json").write_text(json.dumps(inst))
    caps = [{"image_id": 1, "caption": "A woman walks her puppy."}, {"image_id": 2, "caption": "A car parked next to a man on a bench."}]
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    r = chair_coco(tmp_path / "caps.json", tmp_path / "instances.json")
    assert [p["hallucinated"] for p in r["per_caption"]] == [[], ["person", "bench"]]
    assert (r["chair_s"], r["chair_i"]) == pytest.approx((0.5, 2 / 5))
    with pytest.raises(ValueError, match="image_id 7"):
        chair_coco([{"image_id": 7, "caption": "a dog"}], tmp_path / "instances.json")


# COCO's 80 instance categories, as named in instances_val2014.json
COCO_80 = """person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign parking_meter bench bird cat
dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat
baseball_glove skateboard surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot
hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave oven toaster
sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush""".split()
COCO_80 = [w.replace("_", " ") for w in COCO_80]


def test_chair_synonyms_are_chairs_published_rules():
    from vlmcourse.real import COCO_SYNONYMS, coco_synonym_table
    assert sorted(COCO_SYNONYMS) == sorted(COCO_80) and len(COCO_80) == 80
    table = coco_synonym_table()
    assert table["men"] == table["women"] == table["children"] == table["people"] == "person"
    assert table["remote control"] == "remote" and "remote" not in table  # CHAIR counts "remote control" only
    assert "orange" not in table and COCO_SYNONYMS["orange"] == []  # CHAIR has no line for orange, a colour too
    assert coco_mentions("A toilet seat and a stool.") == ["toilet", "chair"]  # "seat" alone would be a chair
    assert coco_mentions("A passenger jet above the train track, then baby animals.") == ["airplane"]
    assert coco_mentions("an adult zebra and a man in a bow tie") == ["zebra", "person", "tie"]


# --- vlmcourse align ----------------------------------------------------------------------------------------------

def test_align_command_on_tiny_llava(tmp_path):
    from vlmcourse.cli import main
    folder = save_tiny_vlm("llava", tmp_path / "llava")
    make_pairs(False).save_to_disk(str(tmp_path / "pairs"))
    assert len(load_pairs(str(tmp_path / "pairs"))) == 4
    assert main(["align", "--model", str(folder), "--pairs", "bpo_inject", "--n-pairs", "4", "--output", str(tmp_path / "out"),
                 "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--lora-r", "4", "--merge"]) == 0
    assert (tmp_path / "out" / "adapter_config.json").exists()
    merged, _ = load_vlm(tmp_path / "out" / "merged", device="cpu")
    base, _ = load_vlm(folder, device="cpu")
    sd = base.state_dict()
    assert any(not torch.equal(v, sd[k]) for k, v in merged.state_dict().items() if k in sd)  # the adapter moved some weights
    assert main(["align", "--model", str(folder), "--pairs", str(tmp_path / "pairs"), "--output", str(tmp_path / "out2"),
                 "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1"]) == 0


def test_align_refuses_instructblip_with_a_clear_error(tmp_path, capsys):
    from vlmcourse.cli import main
    folder = save_tiny_vlm("instructblip", tmp_path / "instructblip")
    assert main(["align", "--model", str(folder), "--n-pairs", "2", "--output", str(tmp_path / "out"), "--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "InstructBLIP" in err and "dpo_train" in err
    assert not (tmp_path / "out").exists()  # nothing half-written
