"""The side-by-side demo (12_demo), driven through `gradio_client` against the launched app.

Two tiny models saved to a temporary folder keep this to seconds: a "prior" model trained for a moment on captions
only (it names shapes whatever the image shows, so it hallucinates), and an untrained one.
"""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import inspect, socket

import pytest
import torch
from PIL import Image

from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from vlmcourse.world import CAPTION_PROMPT, WorldConfig, caption, render, sample_scenes
from vlmcourse.llava import BaseTrainConfig, build_processor, build_vlm, generate, load_vlm, save_vlm, train_base
from vlmcourse.hallucination import chair, evaluate_captions, find_objects, pope_answer
from vlmcourse.llava import answerer
from vlmcourse.demo import DemoConfig, build_app, launch_app, serve
from helpers import free_port, tiny_checkpoints

WCFG = WorldConfig()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    "Checkpoint folders of two tiny models, and a corrupted one."
    root = tmp_path_factory.mktemp("demo-models")
    tiny_checkpoints(root)
    (root / "broken").mkdir(); (root / "broken" / "config.json").write_text("{ this is not json")
    return {k: root / k for k in ("prior", "untrained", "broken")}


@pytest.fixture(scope="module")
def models(folders):
    return {k: load_vlm(folders[k], device="cpu") for k in ("prior", "untrained")}


@pytest.fixture(scope="module")
def client(folders):
    "The app with the prior model on the left and the untrained one on the right, launched on 127.0.0.1."
    app = build_app(left=str(folders["prior"]), right=str(folders["untrained"]))
    url = launch_app(app, port=free_port(), block=False)
    assert url.startswith("http://127.0.0.1:"), url
    yield Client(url, verbose=False)
    app.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    "Image files, good and bad."
    d = tmp_path_factory.mktemp("demo-files")
    scene = sample_scenes(WCFG, 1, seed=7, kind="counter")[0]
    render(scene, WCFG).save(d / "scene.png")
    for mode in ("L", "RGBA", "P"): render(scene, WCFG).convert(mode).save(d / f"scene-{mode}.png")
    (d / "notes.txt").write_text("not an image at all")
    Image.new("RGB", (8000, 8000)).save(d / "huge.png")
    Image.new("RGB", (64, 64), "red").save(d / "cut.png"); (d / "cut.png").write_bytes((d / "cut.png").read_bytes()[:60])
    return d, scene


def text_of(segments) -> str:
    "The answer text from HighlightedText's value as the client receives it."
    return "".join(s["token"] for s in segments)


def ask(client, image, truth=None, prompt=CAPTION_PROMPT):
    return client.predict(handle_file(str(image)) if image else None, truth, prompt, api_name="/ask")


def test_serve_signature_and_defaults():
    p = inspect.signature(serve).parameters
    assert list(p) == ["left", "right", "host", "port", "share"]
    assert p["host"].default == "127.0.0.1" and p["share"].default is False and p["left"].default is None


def test_upload_both_answers(client, files, models):
    d, scene = files
    left, right, verdict = ask(client, d / "scene.png")
    img = Image.open(d / "scene.png")
    assert text_of(left) == generate(*models["prior"], [img], CAPTION_PROMPT)[0]
    assert text_of(right) == generate(*models["untrained"], [img], CAPTION_PROMPT)[0]
    assert text_of(left)  # the prior model always says something
    assert all(s["class_or_confidence"] is None for s in left + right)  # no truth, no highlight
    assert "no ground truth" in verdict


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_greyscale_rgba_palette_work(client, files, models, mode):
    d, _ = files
    left, right, _ = ask(client, d / f"scene-{mode}.png")
    from vlmcourse.clip import to_rgb
    img = to_rgb(Image.open(d / f"scene-{mode}.png"))
    assert text_of(left) == generate(*models["prior"], [img], CAPTION_PROMPT)[0]


def test_world_scene_answers_and_hallucinations(client, models):
    flagged = 0
    for seed in range(6):
        img, truth, nxt = client.predict(seed, "counter", api_name="/new_scene")
        scene = sample_scenes(WCFG, 1, seed=seed, kind="counter")[0]
        assert nxt == seed + 1 and truth["caption"] == caption(scene, WCFG) and truth["kind"] == "counter"
        assert Image.open(img).size == (WCFG.image_size * DemoConfig.display_scale,) * 2
        left, right, verdict = ask(client, img, truth)
        for segs, (m, p) in zip((left, right), (models["prior"], models["untrained"])):
            text = generate(m, p, [render(scene, WCFG)], CAPTION_PROMPT)[0]
            assert text_of(segs) == text
            marked = {s["token"].lower() for s in segs if s["class_or_confidence"] == "hallucinated"}
            expected = set(chair([text], [scene.shapes], WCFG.shapes)["per_caption"][0]["hallucinated"])
            assert {o for w in marked for o in [m.object for m in find_objects(w, WCFG.shapes)]} == expected
            flagged += bool(marked)
        assert "no ground truth" not in verdict
    assert flagged, "the prior model names shapes regardless of the image: some scene must show a hallucination"


def test_probe_table(client, models):
    img, truth, _ = client.predict(3, "counter", api_name="/new_scene")
    scene = sample_scenes(WCFG, 1, seed=3, kind="counter")[0]
    table, summary = client.predict(handle_file(img), truth, api_name="/probe")
    headers, rows = table["headers"], table["data"]
    assert headers[:2] == ["object", "truth"] and len(headers) == 4
    assert [r[0] for r in rows] == list(WCFG.shapes)
    assert [r[1] for r in rows] == ["yes" if s in scene.shapes else "no" for s in WCFG.shapes]
    replies = generate(*models["prior"], [render(scene, WCFG)] * 6, [f"is there a {s} in the image ?" for s in WCFG.shapes])
    assert [r[2].split()[0] for r in rows] == [pope_answer(r) for r in replies]
    assert all(r[2].split()[1] == ("✓" if r[2].split()[0] == r[1] else "✗") for r in rows)
    assert "right" in summary


def test_batch_table_and_chart(client, models):
    table, plot = client.predict(4, 11, "counter", "adversarial", api_name="/batch")
    headers, rows = table["headers"], table["data"]
    assert len(rows) == 2 and "CHAIR_s" in headers and "POPE accuracy" in headers
    ref = evaluate_captions(answerer(*models["prior"]), sample_scenes(WCFG, 4, seed=11, kind="counter"), WCFG)
    assert rows[0][headers.index("CHAIR_s")] == pytest.approx(ref["chair_s"])
    assert plot is not None


BAD = {  # name: (how to call, what the message must say)
    "no image": (lambda c, d, f: ask(c, None), "no image"),
    "not an image": (lambda c, d, f: ask(c, d / "notes.txt"), "is not an image file"),
    "truncated image": (lambda c, d, f: ask(c, d / "cut.png"), "cut.png"),
    "8000x8000": (lambda c, d, f: ask(c, d / "huge.png"), f"8000x8000 = 64,000,000 pixels, above the limit of {DemoConfig.max_pixels:,}"),
    "empty prompt": (lambda c, d, f: ask(c, d / "scene.png", prompt="   "), "the prompt is empty"),
    "overlong prompt": (lambda c, d, f: ask(c, d / "scene.png", prompt="is there " * 40), f"the limit is {DemoConfig.max_prompt_chars} characters"),
    "not a scene": (lambda c, d, f: ask(c, None, {"objects": [{"shape": "cat"}]}), "not a Shapes world scene"),
    "batch of 0": (lambda c, d, f: c.predict(0, 1, "counter", "adversarial", api_name="/batch"), f"between 1 and {DemoConfig.max_batch_scenes}"),
    "missing checkpoint": (lambda c, d, f: c.predict(str(f["prior"].parent / "no-such-model"), api_name="/load_left"), "no checkpoint folder"),
    "corrupted checkpoint": (lambda c, d, f: c.predict(str(f["broken"]), api_name="/load_right"), "corrupted"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_says_what_is_wrong_and_app_stays_up(client, files, folders, models, name):
    d, _ = files
    call, message = BAD[name]
    with pytest.raises(AppError) as e:
        call(client, d, folders)
    assert message in str(e.value), str(e.value)
    left, right, _ = ask(client, d / "scene.png")
    img = Image.open(d / "scene.png")
    assert text_of(left) == generate(*models["prior"], [img], CAPTION_PROMPT)[0]  # the same models still answer
    assert text_of(right) == generate(*models["untrained"], [img], CAPTION_PROMPT)[0]


def test_load_a_checkpoint_from_the_app(client, folders, files, models):
    status, _ = client.predict(str(folders["untrained"]), api_name="/load_left")
    try:
        assert "left**: untrained" in status
        left, right, _ = ask(client, files[0] / "scene.png")
        assert text_of(left) == text_of(right)  # both sides are now the untrained model
    finally:
        status, _ = client.predict(str(folders["prior"]), api_name="/load_left")
    assert "left**: prior" in status


def test_analytics_off_and_models_load_lazily():
    app = build_app(left="/no/such/folder", right="/no/such/folder")  # nothing is loaded until a request needs it
    assert app.analytics_enabled is False


def test_busy_port_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0)); busy.listen()
        with pytest.raises(ValueError, match="in use"):
            launch_app(build_app(), port=busy.getsockname()[1], block=False)
