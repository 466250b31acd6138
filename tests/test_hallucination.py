"Hand-computed cases for vlmcourse.hallucination: POPE's parsing and metrics, CHAIR, the highlighter, bad input."
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from vlmcourse.llava import answerer
from vlmcourse.hallucination import Mention, chair, find_objects, highlight_hallucinations, plural, pope_answer, pope_metrics

SHAPES = ["circle", "square", "triangle", "diamond", "cross", "ring"]


# --- POPE: the reading of a reply ---------------------------------------------------------------------------

@pytest.mark.parametrize("reply, expected", [
    ("No, there is not.", "no"),
    ("Yes. No cars.", "yes"),  # only the first sentence counts
    ("I do not see one", "no"),
    ("yes .", "yes"),
    ("no .", "no"),
    ("There is a square in the image.", "yes"),  # no negation: POPE reads it as yes
    ("Not really.", "no"),  # any case
    ("NO", "no"),
    ("no!", "no"),  # punctuation glued on
    ("There is nothing.", "yes"),  # 'no' inside a word is not the word 'no'
    ("a note", "yes"),
    ("", "yes"),  # an empty reply has no negation
    (". no", "yes"),  # the first sentence is empty
])
def test_pope_answer(reply, expected):
    assert pope_answer(reply) == expected


def test_pope_answer_rejects_non_strings():
    with pytest.raises(TypeError, match="must be a string"):
        pope_answer(None)


# --- POPE: the metrics ----------------------------------------------------------------------------------------

def test_pope_metrics_hand_computed():
    # readings: yes no yes no yes yes; labels: yes no no yes yes no -> TP 2, FP 2, TN 1, FN 1
    answers = ["Yes, there is.", "No, there is not.", "Yes. No cars.", "I do not see one", "yes .", "There is a square."]
    labels = ["yes", "no", "no", "yes", "yes", "no"]
    m = pope_metrics(answers, labels)
    assert set(m) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["yes_ratio"] == pytest.approx(4 / 6)


def test_pope_metrics_perfect():
    m = pope_metrics(["yes .", "no .", "Yes", "No"], ["yes", "no", "yes", "no"])
    assert m == dict(accuracy=1.0, precision=1.0, recall=1.0, f1=1.0, yes_ratio=0.5)


def test_pope_metrics_never_yes_is_not_a_crash():
    m = pope_metrics(["no ."] * 4, ["yes", "no", "yes", "no"])
    assert m == dict(accuracy=0.5, precision=0.0, recall=0.0, f1=0.0, yes_ratio=0.0)


def test_pope_metrics_always_yes():
    m = pope_metrics(["yes ."] * 4, ["yes", "no", "no", "no"])
    assert m["precision"] == pytest.approx(1 / 4) and m["recall"] == 1.0 and m["yes_ratio"] == 1.0
    assert m["f1"] == pytest.approx(2 * 0.25 / 1.25)


def test_pope_metrics_no_positive_labels():
    m = pope_metrics(["no", "yes"], ["no", "no"])  # recall's denominator is empty: 0, not a crash
    assert m == dict(accuracy=0.5, precision=0.0, recall=0.0, f1=0.0, yes_ratio=0.5)


@pytest.mark.parametrize("answers, labels, exc, msg", [
    ([], [], ValueError, "at least one"),
    (["yes"], ["yes", "no"], ValueError, "1 answers but 2 labels"),
    (["yes", "no"], ["yes"], ValueError, "2 answers but 1 labels"),
    (["yes"], ["Yes"], ValueError, "'yes' or 'no'"),
    (["yes"], [1], ValueError, "'yes' or 'no'"),
    ("yes", ["yes"], TypeError, "lists of strings"),
    ([None], ["yes"], TypeError, "must be a string"),
])
def test_pope_metrics_bad_input(answers, labels, exc, msg):
    with pytest.raises(exc, match=msg):
        pope_metrics(answers, labels)


# --- object matching ------------------------------------------------------------------------------------------

def test_plural():
    assert [plural(w) for w in ["circle", "cross", "box", "bus", "dish"]] == ["circles", "crosses", "boxes", "buses", "dishes"]


def test_find_objects_plurals_boundaries_and_spans():
    text = "Two Crosses and a ring on a string, circles."
    found = find_objects(text, SHAPES)
    assert [(m.word, m.object) for m in found] == [("Crosses", "cross"), ("ring", "ring"), ("circles", "circle")]
    assert all(text[m.start:m.end] == m.word for m in found)
    assert isinstance(found[0], Mention)


def test_find_objects_multiword_objects():
    found = find_objects("a traffic light and a light", ["traffic light", "light"])
    assert [m.object for m in found] == ["traffic light", "light"]


def test_find_objects_bad_input():
    with pytest.raises(TypeError, match="list of object words"):
        find_objects("a circle", "circle")
    with pytest.raises(ValueError, match="non-empty"):
        find_objects("a circle", [])
    with pytest.raises(TypeError, match="text must be a string"):
        find_objects(None, SHAPES)


# --- CHAIR ----------------------------------------------------------------------------------------------------

def test_chair_hand_computed():
    caps = ["a red circle at top left and a blue square at bottom right .",  # square hallucinated
            "two crosses and a ring on a string .",  # plural; 'ring' is not found in 'string'
            "",  # an empty caption mentions nothing
            "a square, a square and a diamond"]  # square counted once; diamond hallucinated
    truths = [{"circle"}, {"cross", "ring"}, {"triangle"}, {"square"}]
    r = chair(caps, truths, SHAPES)
    assert r["chair_s"] == pytest.approx(2 / 4)
    assert r["chair_i"] == pytest.approx(2 / 6)
    assert [p["mentioned"] for p in r["per_caption"]] == [["circle", "square"], ["cross", "ring"], [], ["square", "diamond"]]
    assert [p["hallucinated"] for p in r["per_caption"]] == [["square"], [], [], ["diamond"]]


def test_chair_word_boundaries():
    r = chair(["a string and strings", "rings"], [set(), set()], SHAPES)
    assert r["per_caption"][0]["mentioned"] == [] and r["per_caption"][1]["hallucinated"] == ["ring"]
    assert r["chair_s"] == 0.5 and r["chair_i"] == 1.0


def test_chair_all_empty_captions():
    r = chair(["", ""], [{"circle"}, set()], SHAPES)
    assert (r["chair_s"], r["chair_i"]) == (0.0, 0.0)


def test_chair_no_hallucination():
    r = chair(["a circle and a square ."], [{"circle", "square", "ring"}], SHAPES)
    assert (r["chair_s"], r["chair_i"]) == (0.0, 0.0)


def test_chair_accepts_any_iterable_truth():
    r = chair(["a circle and a square ."], [frozenset({"circle"})], SHAPES)
    assert r["per_caption"][0]["hallucinated"] == ["square"]
    r = chair(["a Circle ."], [["CIRCLE"]], SHAPES)  # case does not matter
    assert r["chair_s"] == 0.0


@pytest.mark.parametrize("caps, truths, exc, msg", [
    ([], [], ValueError, "at least one"),
    (["a circle"], [{"circle"}, {"square"}], ValueError, "1 captions but 2 truths"),
    (["a circle"], [{"circles"}], ValueError, "singular"),
    (["a circle"], [{"hexagon"}], ValueError, "not in objects"),
    (["a circle"], ["circle"], TypeError, "set of object words"),
    ("a circle", [{"circle"}], TypeError, "not one string"),
])
def test_chair_bad_input(caps, truths, exc, msg):
    with pytest.raises(exc, match=msg):
        chair(caps, truths, SHAPES)


# --- the highlighter --------------------------------------------------------------------------------------------

def test_highlight_hallucinations():
    text = "a circle and Squares ."  # 'Squares' starts after 'a circle and ' (13 characters)
    hl = highlight_hallucinations(text, {"circle"}, SHAPES)
    assert [(m.word, m.object, m.start, m.end) for m in hl] == [("Squares", "square", 13, 20)]
    assert highlight_hallucinations("a ring on a string", {"ring"}, SHAPES) == []


def test_highlight_agrees_with_chair():
    caps = ["a circle and a square .", "a triangle , a diamond and a cross", "squares squares"]
    truths = [{"circle"}, {"triangle", "cross"}, set()]
    r = chair(caps, truths, SHAPES)
    for cap, truth, p in zip(caps, truths, r["per_caption"]):
        assert list(dict.fromkeys(m.object for m in highlight_hallucinations(cap, truth, SHAPES))) == p["hallucinated"]


# --- the model helpers, on an untrained tiny model (no training: only the plumbing and the bookkeeping) ----------

@pytest.fixture(scope="module")
def tiny():
    import torch
    from vlmcourse.llava import build_processor, build_vlm
    from vlmcourse.world import WorldConfig
    torch.set_num_threads(1)
    wcfg = WorldConfig()
    proc = build_processor(wcfg)
    return build_vlm(proc, seed=0), proc, wcfg


def test_evaluate_captions_bookkeeping(tiny):
    from vlmcourse.hallucination import evaluate_captions
    from vlmcourse.world import caption, sample_scenes
    model, proc, wcfg = tiny
    scenes = sample_scenes(wcfg, 3, seed=5, kind="counter")
    r = evaluate_captions(answerer(model, proc), scenes, wcfg)
    assert len(r["captions"]) == 3 and all(isinstance(c, str) for c in r["captions"])
    ref = chair(r["captions"], [s.shapes for s in scenes], wcfg.shapes)
    assert (r["chair_s"], r["chair_i"]) == (ref["chair_s"], ref["chair_i"])
    assert r["exact"] == sum(c == caption(s, wcfg) for c, s in zip(r["captions"], scenes)) / 3
    found = sum(len(set(p["mentioned"]) & s.shapes) for p, s in zip(ref["per_caption"], scenes))
    assert r["recall"] == found / sum(len(s.shapes) for s in scenes)


def test_evaluate_pope_bookkeeping(tiny):
    from vlmcourse.hallucination import POPE_METRICS, evaluate_pope
    from vlmcourse.world import pope_probes, sample_scenes
    model, proc, wcfg = tiny
    scenes = sample_scenes(wcfg, 2, seed=5, kind="counter")
    r = evaluate_pope(answerer(model, proc), scenes, wcfg, "adversarial")
    assert r["probes"] == pope_probes(scenes, wcfg, "adversarial")
    assert len(r["answers"]) == len(r["probes"])
    ref = pope_metrics(r["answers"], [p["label"] for p in r["probes"]])
    assert {k: r[k] for k in POPE_METRICS} == ref


def test_evaluators_refuse_bad_input(tiny):
    from vlmcourse.hallucination import evaluate_captions, evaluate_pope, hallucination_report
    from vlmcourse.world import sample_scenes
    model, proc, wcfg = tiny
    with pytest.raises(ValueError, match="at least one"):
        evaluate_captions(answerer(model, proc), [], wcfg)
    with pytest.raises(ValueError, match="at least one"):
        evaluate_pope(answerer(model, proc), [], wcfg, "random")
    with pytest.raises(ValueError, match="n must be at least 1"):
        hallucination_report(answerer(model, proc), wcfg, n=0)
    with pytest.raises(TypeError, match="answer is a model"):
        evaluate_captions(model, [object()], wcfg)  # the old (model, processor) call gets a message, not a deep traceback
    with pytest.raises(TypeError, match="answer must be a function"):
        evaluate_pope("not a function", sample_scenes(wcfg, 1), wcfg)


def test_the_yardstick_scores_any_answering_function():
    "No model at all: an oracle that reads the scene's truth, and a liar that always names the missing partner."
    from vlmcourse.hallucination import evaluate_captions, evaluate_pope
    from vlmcourse.world import WorldConfig, caption, render, sample_scenes
    wcfg = WorldConfig()
    scenes = sample_scenes(wcfg, 20, seed=3, kind="counter")
    truth = {render(s, wcfg).tobytes(): s for s in scenes}
    def oracle(images, questions):
        out = []
        for img, q in zip(images, questions):
            s = truth[img.tobytes()]
            out.append(caption(s, wcfg) if "describe" in q or "caption" in q else ("yes ." if any(f" {o} " in q for o in s.shapes) else "no ."))
        return out
    r = evaluate_captions(oracle, scenes, wcfg)
    assert r["chair_s"] == 0 and r["exact"] == 1 and r["recall"] == 1
    assert evaluate_pope(oracle, scenes, wcfg, "adversarial")["accuracy"] == 1
    assert evaluate_pope(lambda ims, qs: ["yes ."] * len(qs), scenes, wcfg, "adversarial")["accuracy"] == 0.5
    with pytest.raises(ValueError, match="one string per question"):
        evaluate_pope(lambda ims, qs: ["yes ."], scenes, wcfg, "random")


def test_pope_strict_rule_is_popes_evaluate_py():
    "POPE's evaluate.py: first sentence, commas deleted, split on spaces, exact words No / no / not."
    from vlmcourse.hallucination import pope_answer, pope_metrics
    differ = {"Not at all.": ("no", "yes"), "No!": ("no", "yes"), "There is no-one there.": ("no", "yes")}
    for reply, (lenient, strict) in differ.items():
        assert pope_answer(reply) == lenient and pope_answer(reply, strict=True) == strict
    for reply in ("yes .", "no .", "No, there is not.", "I do not see one", "Yes, a circle. No square."):
        assert pope_answer(reply) == pope_answer(reply, strict=True)
    assert pope_metrics(["No!", "yes ."], ["no", "yes"])["accuracy"] == 1.0
    assert pope_metrics(["No!", "yes ."], ["no", "yes"], strict=True)["accuracy"] == 0.5
