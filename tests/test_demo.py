"""The side-by-side demo (13_demo), driven through `gradio_client` against the launched app.

Three tiny models saved to a temporary folder keep this to seconds: a "prior" model trained for a moment on captions
only (it names shapes whatever the image shows, so it hallucinates), an untrained one, and a "yes-sayer" trained for
a moment on presence questions only (it answers "yes ." to every "is there a ... ?"). The prior model is offered
through the course's registry, under a name this module registers, as a lesson's model would be.
"""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import html, inspect, re, socket
from pathlib import Path

import pytest
from PIL import Image

from gradio_client import Client, handle_file

from vlmcourse.world import CAPTION_PROMPT, WorldConfig, caption, presence_question, render, sample_scenes
from vlmcourse.llava import generate, load_vlm
from vlmcourse.hallucination import chair, evaluate_captions, find_objects, pope_answer
from vlmcourse.llava import answerer
from vlmcourse import registry
from vlmcourse.demo import DemoConfig, SideBySide, build_app, launch_app, metrics_chart, serve
from vlmcourse.cli import build_parser
from helpers import free_port, tiny_checkpoints, yes_sayer

WCFG = WorldConfig()
PRIOR = {}  # where `prior_path` finds the prior model's folder, set by the `folders` fixture


def prior_path(progress=True):
    "The registry's path function of the test's 'tiny-prior' entry."
    return PRIOR["path"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    "Checkpoint folders under one shelf (the app's --models-dir): prior, untrained, yes, and a corrupted one."
    root = tmp_path_factory.mktemp("demo-models")
    shelf = root / "shelf"
    tiny_checkpoints(shelf)
    yes_sayer(shelf / "yes")
    (shelf / "broken").mkdir(); (shelf / "broken" / "config.json").write_text("{ this is not json")
    (root / "elsewhere").mkdir(); tiny_checkpoints(root / "elsewhere")  # real checkpoints the app does not offer
    PRIOR["path"] = shelf / "prior"
    entry = registry.register(registry.ModelEntry("tiny-prior", "a moment of caption training: names shapes whatever it sees",
                                                  "99_test", f"{__name__}:prior_path"))
    yield {"shelf": shelf, "elsewhere": root / "elsewhere", **{k: shelf / k for k in ("prior", "untrained", "yes", "broken")}}
    registry._REGISTRY.pop(entry.name, None)


@pytest.fixture(scope="module")
def models(folders):
    return {k: load_vlm(folders[k], device="cpu") for k in ("prior", "untrained", "yes")}


@pytest.fixture(scope="module")
def app_url(folders):
    "The app with the registry's tiny-prior on the left and an operator's folder (untrained) on the right, offering the shelf."
    app = build_app(left="tiny-prior", right=str(folders["untrained"]), models_dir=folders["shelf"])
    url = launch_app(app, port=free_port(), block=False)
    assert url.startswith("http://127.0.0.1:"), url
    yield url
    app.close()


@pytest.fixture(scope="module")
def client(app_url): return Client(app_url, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    "Image files, good and bad."
    d = tmp_path_factory.mktemp("demo-files")
    scene = sample_scenes(WCFG, 1, seed=7, kind="counter")[0]
    render(scene, WCFG).save(d / "scene.png")
    for mode in ("L", "RGBA", "P"): render(scene, WCFG).convert(mode).save(d / f"scene-{mode}.png")
    Image.effect_noise((120, 90), 60).convert("RGB").save(d / "photo.png")
    (d / "notes.txt").write_text("not an image at all")
    Image.new("RGB", (8000, 8000)).save(d / "huge.png")
    Image.new("RGB", (64, 64), "red").save(d / "cut.png"); (d / "cut.png").write_bytes((d / "cut.png").read_bytes()[:60])
    return d, scene


def text_of(segments) -> str:
    "The answer text from HighlightedText's value as the client receives it."
    return "".join(s["token"] for s in segments)


def message(html_box) -> str:
    "The text of an inline message box, as a reader sees it."
    return html.unescape(re.sub(r"<[^>]+>", "", html_box or "")).strip()


def ask(client, image, truth=None, prompt=CAPTION_PROMPT):
    "(left segments, right segments, verdict, message) of the Ask tab."
    return client.predict(handle_file(str(image)) if image else None, truth, prompt, api_name="/ask")


def answers_match(client, models, files, left="prior", right="untrained"):
    "Whether the client's two answers on the scene file are the named models' own."
    l, r, _, msg = ask(client, files[0] / "scene.png")
    img = Image.open(files[0] / "scene.png")
    assert msg == "", msg
    return (text_of(l) == generate(*models[left], [img], CAPTION_PROMPT)[0], text_of(r) == generate(*models[right], [img], CAPTION_PROMPT)[0])


def test_serve_signature_and_cli():
    p = inspect.signature(serve).parameters
    assert list(p) == ["left", "right", "host", "port", "share", "models_dir", "allow_hub"]
    assert p["host"].default == "127.0.0.1" and p["share"].default is False and p["left"].default is None
    assert p["models_dir"].default is None and p["allow_hub"].default is False
    a = build_parser().parse_args(["demo", "--models-dir", "ckpts", "--allow-hub"])
    assert a.models_dir == "ckpts" and a.allow_hub is True
    a = build_parser().parse_args(["demo"])
    assert a.models_dir is None and a.allow_hub is False


def test_upload_both_answers(client, files, models):
    d, scene = files
    left, right, verdict, msg = ask(client, d / "scene.png")
    img = Image.open(d / "scene.png")
    assert text_of(left) == generate(*models["prior"], [img], CAPTION_PROMPT)[0]
    assert text_of(right) == generate(*models["untrained"], [img], CAPTION_PROMPT)[0]
    assert text_of(left)  # the prior model always says something
    assert all(s["class_or_confidence"] is None for s in left + right)  # no truth, no highlight
    assert "no ground truth" in verdict and "not a Shapes world scene" not in verdict and msg == ""


def test_an_upload_that_is_no_world_scene_says_so_beside_the_answers(client, files):
    left, right, verdict, msg = ask(client, files[0] / "photo.png")
    assert text_of(left) and "not a Shapes world scene" in verdict and "32-pixel" in verdict and msg == ""


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_greyscale_rgba_palette_work(client, files, models, mode):
    d, _ = files
    left, right, verdict, _ = ask(client, d / f"scene-{mode}.png")
    from vlmcourse.clip import to_rgb
    img = to_rgb(Image.open(d / f"scene-{mode}.png"))
    assert text_of(left) == generate(*models["prior"], [img], CAPTION_PROMPT)[0]
    assert ("not a Shapes world scene" in verdict) == (mode == "L")  # RGBA and palette keep (nearly) the world's colours; grey is new to the models


def test_world_scene_answers_and_hallucinations(client, models):
    flagged = 0
    for seed in range(6):
        img, truth, truth_md, shown, msg = client.predict(seed, "counter", api_name="/new_scene")
        scene = sample_scenes(WCFG, 1, seed=seed, kind="counter")[0]
        assert shown == seed and msg == ""  # the seed box shows the scene's own seed
        assert truth["caption"] == caption(scene, WCFG) and truth["kind"] == "counter"
        assert truth_md.startswith(f"**True caption:** {caption(scene, WCFG)}") and "a partner missing" in truth_md
        assert Image.open(img).size == (WCFG.image_size * DemoConfig.display_scale,) * 2
        left, right, verdict, _ = ask(client, img, truth)
        for segs, (m, p) in zip((left, right), (models["prior"], models["untrained"])):
            text = generate(m, p, [render(scene, WCFG)], CAPTION_PROMPT)[0]
            assert text_of(segs) == text
            marked = {s["token"].lower() for s in segs if s["class_or_confidence"] == "hallucinated"}
            expected = set(chair([text], [scene.shapes], WCFG.shapes)["per_caption"][0]["hallucinated"])
            assert {o for w in marked for o in [m.object for m in find_objects(w, WCFG.shapes)]} == expected
            flagged += bool(marked)
        assert "no ground truth" not in verdict
    assert flagged, "the prior model names shapes regardless of the image: some scene must show a hallucination"
    _, _, _, shown, _ = client.predict(41, "counter", api_name="/next_scene")
    assert shown == 42


def test_a_yes_to_an_absent_object_is_flagged(app_url, models):
    c = Client(app_url, verbose=False)  # a session of its own: it puts the yes-sayer on the left
    c.predict("yes", api_name="/load_left")
    _, truth, *_ = c.predict(3, "counter", api_name="/new_scene")
    scene = sample_scenes(WCFG, 1, seed=3, kind="counter")[0]
    seen = set()
    for obj in WCFG.shapes:
        q = presence_question(obj)
        said = pope_answer(generate(*models["yes"], [render(scene, WCFG)], q)[0])
        left, _, verdict, msg = c.predict(None, truth, q, api_name="/ask")
        labels = [s["class_or_confidence"] for s in left if s["token"].strip(" .").lower() in ("yes", "no")]
        want = ("hallucinated" if said == "yes" and obj not in scene.shapes else "missed" if said == "no" and obj in scene.shapes else
                "in the scene" if obj in scene.shapes else None)
        assert labels == [want], (obj, said, left)
        line = verdict.split("  \n")[0]
        assert (f"hallucinated {obj}" in line) == (want == "hallucinated") and (f"missed the {obj}" in line) == (want == "missed"), line
        seen.add(want)
    assert "hallucinated" in seen, "the yes-sayer answers yes to every presence question: an absent object must be flagged"


def test_find_a_disagreement(client, models):
    img, truth, truth_md, seed, kind, left, right, verdict, msg = client.predict(0, CAPTION_PROMPT, api_name="/find_disagreement")
    text = message(msg)
    tried = int(re.search(r"Tried (\d+) counter-prior scene", text).group(1))
    assert 1 <= tried <= DemoConfig.disagreement_tries and kind == "counter" and truth["seed"] == seed
    answers = lambda s: [generate(*models[k], [render(sample_scenes(WCFG, 1, seed=s, kind="counter")[0], WCFG)], CAPTION_PROMPT)[0]
                         for k in ("prior", "untrained")]
    for s in range(1, seed): assert len(set(answers(s))) == 1, s  # the scenes before it: the same answer
    if "differently" in text:
        assert seed == tried and answers(seed) == [text_of(left), text_of(right)] and text_of(left) != text_of(right)
    else: assert seed == DemoConfig.disagreement_tries and len(set(answers(seed))) == 1


def test_probe_table(client, models):
    img, truth, *_ = client.predict(3, "counter", api_name="/new_scene")
    scene = sample_scenes(WCFG, 1, seed=3, kind="counter")[0]
    table, summary, msg = client.predict(handle_file(img), truth, api_name="/probe")
    headers, rows = table["headers"], table["data"]
    assert headers == ["object", "truth", "left: tiny-prior", f"right: untrained"] and msg == ""
    assert [r[0] for r in rows] == list(WCFG.shapes)
    assert [r[1] for r in rows] == ["yes" if s in scene.shapes else "no" for s in WCFG.shapes]
    replies = generate(*models["prior"], [render(scene, WCFG)] * 6, [f"is there a {s} in the image ?" for s in WCFG.shapes])
    assert [r[2].split()[0] for r in rows] == [pope_answer(r) for r in replies]
    assert all(r[2].split()[1] == ("✓" if r[2].split()[0] == r[1] else "✗") for r in rows)
    assert "right" in summary


def test_batch_table_and_chart(client, models):
    table, plot, msg = client.predict(4, 11, "counter", "adversarial", api_name="/batch")
    headers, rows = table["headers"], table["data"]
    assert headers == ["metric", "left: tiny-prior", "right: untrained"] and msg == ""  # one row per metric: no column cut
    metrics = [r[0] for r in rows]
    assert "CHAIR_s" in metrics and "POPE accuracy" in metrics and "POPE yes-ratio" in metrics
    ref = evaluate_captions(answerer(*models["prior"]), sample_scenes(WCFG, 4, seed=11, kind="counter"), WCFG)
    assert rows[metrics.index("CHAIR_s")][1] == pytest.approx(ref["chair_s"], abs=5e-4)
    assert all(v == round(v, 3) for r in rows for v in r[1:])  # 3 places, not 16 digits
    assert plot is not None


def test_a_zero_bar_is_labelled():
    import pandas as pd
    fig = metrics_chart(pd.DataFrame({"metric": ["CHAIR_s", "POPE F1"], "left: a": [0.0, 0.5], "right: b": [0.25, 1.0]}))
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels.count("0.00") == 1 and "0.25" in labels and "1.00" in labels


BAD = {  # name: (how to call, which output holds the message, what the message must say)
    "no image": (lambda c, d, f: ask(c, None), "no image"),
    "not an image": (lambda c, d, f: ask(c, d / "notes.txt"), "is not an image file"),
    "truncated image": (lambda c, d, f: ask(c, d / "cut.png"), "cut.png"),
    "8000x8000": (lambda c, d, f: ask(c, d / "huge.png"), f"8000x8000 = 64,000,000 pixels, above the limit of {DemoConfig.max_pixels:,}"),
    "empty prompt": (lambda c, d, f: ask(c, d / "scene.png", prompt="   "), "the prompt is empty"),
    "overlong prompt": (lambda c, d, f: ask(c, d / "scene.png", prompt="is there " * 40), f"the limit is {DemoConfig.max_prompt_chars} characters"),
    "not a scene": (lambda c, d, f: ask(c, None, {"objects": [{"shape": "cat"}]}), "not a Shapes world scene"),
    "seed 10**30": (lambda c, d, f: c.predict(10**30, "counter", api_name="/new_scene"), "whole number from 0 to 4,294,967,295"),
    "negative seed": (lambda c, d, f: c.predict(-3, "counter", api_name="/new_scene"), "whole number from 0 to 4,294,967,295"),
    "next after the last seed": (lambda c, d, f: c.predict(2**32 - 1, "counter", api_name="/next_scene"), "got 4294967296"),
    "disagreement from 10**30": (lambda c, d, f: c.predict(10**30, CAPTION_PROMPT, api_name="/find_disagreement"), "whole number from 0"),
    "batch of 0": (lambda c, d, f: c.predict(0, 1, "counter", "adversarial", api_name="/batch"), f"between 1 and {DemoConfig.max_batch_scenes}"),
    "batch seed 10**30": (lambda c, d, f: c.predict(5, 10**30, "counter", "adversarial", api_name="/batch"), "whole number from 0"),
    "corrupted checkpoint": (lambda c, d, f: c.predict("broken", api_name="/load_right"), "'broken' could not be loaded"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_says_what_is_wrong_beside_it_and_loses_nothing(client, files, folders, models, name):
    d, _ = files
    call, want = BAD[name]
    out = call(client, d, folders)
    text = message(out[-1])
    assert want in text, text
    assert all(o == {"__type__": "update"} for o in out[:-1]), out[:-1]  # the other outputs are left as they were
    assert "Traceback" not in text and str(folders["shelf"]) not in text  # no server path in any message
    assert answers_match(client, models, files) == (True, True)  # the same models still answer


REFUSED = {"an absolute path": lambda f: "/etc", "a checkpoint elsewhere on the server": lambda f: str(f["elsewhere"] / "prior"),
           "a missing folder": lambda f: str(f["elsewhere"] / "nowhere"), "a relative escape": lambda f: "../elsewhere/prior",
           "a shelf folder by its full path": lambda f: str(f["prior"]), "a Hub id": lambda f: "llava-hf/llava-1.5-7b-hf",
           "an unknown name": lambda f: "no-such-model"}


def test_a_model_not_on_the_menu_gets_one_message_that_reveals_nothing(client, files, folders, models):
    texts = {}
    for name, path in REFUSED.items():
        status, label, msg = client.predict(path(folders), api_name="/load_left")
        assert status == {"__type__": "update"} and label == {"__type__": "update"}
        texts[name] = message(msg)
    tails = {t.split(" is not a model")[-1] for t in texts.values()}
    assert tails == {" this app offers: choose one from the list"}, texts  # the same words whether the folder exists or not
    assert answers_match(client, models, files) == (True, True)


def test_two_sessions_choose_their_own_models(app_url, folders, files, models):
    a, b = Client(app_url, verbose=False), Client(app_url, verbose=False)
    status, label, msg = a.predict("untrained", api_name="/load_left")
    assert msg == "" and label["label"] == "left: untrained" and "**left**: untrained" in status and "loaded:" in status
    status_b, label_b, _ = b.predict("yes", api_name="/load_right")
    assert label_b["label"] == "right: yes" and "**left**: tiny-prior" in status_b
    assert answers_match(a, models, files, "untrained", "untrained") == (True, True)  # a: untrained on both sides
    assert answers_match(b, models, files, "prior", "yes") == (True, True)  # b: its own right, the default left
    table_a = a.predict(2, 5, "counter", "random", api_name="/batch")[0]
    assert table_a["headers"] == ["metric", "left: untrained", "right: untrained"]


def test_an_escaped_message(client):
    _, _, msg = client.predict("<class 'int'>", api_name="/load_left")
    assert "&lt;class &#x27;int&#x27;&gt;" in msg and "<class" not in msg  # shown as written, not taken for a tag
    assert message(msg).startswith("⚠ \"<class 'int'>\" is not a model this app offers")


def test_hub_ids_only_when_allowed(folders):
    closed = SideBySide("tiny-prior", str(folders["untrained"]))
    with pytest.raises(ValueError, match="not a model this app offers: choose one from the list$"): closed.menu.resolve("owner/model")
    opened = SideBySide("tiny-prior", str(folders["untrained"]), allow_hub=True)
    assert opened.menu.resolve("owner/model").hub
    with pytest.raises(ValueError, match="or type a Hugging Face Hub id"): opened.menu.resolve("/etc/passwd")
    with pytest.raises(ValueError, match="could not load 'owner/model' from the Hugging Face Hub"): opened.choose("left", "owner/model")
    assert opened.choice() == {"left": "tiny-prior", "right": "untrained"}


def test_the_cache_is_bounded_and_shared(folders):
    sbs = SideBySide("tiny-prior", str(folders["untrained"]), DemoConfig(cache_size=2), models_dir=folders["shelf"])
    first = sbs.model("untrained")
    assert sbs.model("untrained") is first  # a second visitor gets the same loaded model
    for name in ("tiny-prior", "yes", "untrained", "prior"): sbs.model(name)  # 'prior' on the shelf is the tiny-prior folder, another key
    assert len(sbs.cache) == 2


def test_analytics_off_and_models_load_lazily():
    app = build_app(left="/no/such/folder", right="/no/such/folder")  # nothing is loaded until a request needs it
    assert app.analytics_enabled is False


def test_busy_port_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0)); busy.listen()
        with pytest.raises(ValueError, match="in use"):
            launch_app(build_app(), port=busy.getsockname()[1], block=False)
