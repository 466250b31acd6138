"""The side-by-side demo (12_demo) in a real browser: Debian's chromium, driven by Playwright's Python API.

`playwright install` cannot download browsers here, so the test uses the system's /usr/bin/chromium
(`apt-get install -y chromium`) and skips, saying so, when it is absent.
"""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"no browser at {CHROMIUM}: install Debian's chromium (apt-get install -y chromium) to run the browser test",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install playwright)")

from PIL import Image
from vlmcourse.world import CAPTION_PROMPT, WorldConfig, presence_question, render, sample_scenes
from vlmcourse.llava import BaseTrainConfig, build_processor, build_vlm, generate, load_vlm, save_vlm, train_base
from vlmcourse.hallucination import pope_answer
from vlmcourse.demo import build_app, launch_app
from helpers import free_port, tiny_checkpoints

WCFG = WorldConfig()
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]
TIMEOUT = 60_000  # ms: the first request loads both models


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    "Two tiny models in checkpoint folders, the launched app, and a scene image to upload."
    root = tmp_path_factory.mktemp("demo-browser")
    tiny_checkpoints(root)
    scene = sample_scenes(WCFG, 1, seed=5, kind="counter")[0]
    render(scene, WCFG).save(root / "scene.png")
    app = build_app(left=str(root / "prior"), right=str(root / "untrained"))
    url = launch_app(app, port=free_port(), block=False)
    yield dict(url=url, root=root, models={k: load_vlm(root / k, device="cpu") for k in ("prior", "untrained")})
    app.close()


@pytest.fixture(scope="module")
def page(setup):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        pg = browser.new_page()
        pg.set_default_timeout(TIMEOUT)
        pg.goto(setup["url"])
        yield pg
        browser.close()


def answer_text(page, side) -> str:
    "The answer shown in one HighlightedText box, as one string."
    return " ".join(page.locator(f"#answer-{side} .token .text").all_inner_texts())


def norm(s): return " ".join(s.split())


def test_upload_ask_read_both_answers(page, setup):
    img_path = setup["root"] / "scene.png"
    page.locator("#image input[type=file]").set_input_files(str(img_path))
    page.locator("#image img").first.wait_for()  # the preview is shown
    page.locator("#prompt textarea").fill(CAPTION_PROMPT)
    page.locator("#ask").click()
    page.locator("#verdict").get_by_text("no ground truth").first.wait_for()
    img = Image.open(img_path)
    for side, key in (("left", "prior"), ("right", "untrained")):
        want = generate(*setup["models"][key], [img], CAPTION_PROMPT)[0]
        assert norm(answer_text(page, side)) == norm(want), side


def test_probe_tab_table(page, setup):
    page.locator("#seed input").fill("3")
    page.locator("#new-scene").click()
    page.locator("#truth").get_by_text("counter").first.wait_for()
    page.get_by_role("tab", name="Probe").click()
    page.locator("#probe").click()
    page.locator("#probe-summary").get_by_text("right").first.wait_for()
    grid = page.locator("#probe-table [role=grid]")
    n_rows, n_cols = int(grid.get_attribute("aria-rowcount")) - 1, int(grid.get_attribute("aria-colcount"))  # minus the header
    assert n_cols == 4
    cells = [[grid.locator(f"[data-testid=cell-{r}-{c}]").inner_text().strip() for c in range(n_cols)] for r in range(n_rows)]
    scene = sample_scenes(WCFG, 1, seed=3, kind="counter")[0]
    assert [r[0] for r in cells] == list(WCFG.shapes), cells
    assert [r[1] for r in cells] == ["yes" if s in scene.shapes else "no" for s in WCFG.shapes]
    replies = generate(*setup["models"]["prior"], [render(scene, WCFG)] * len(WCFG.shapes), [presence_question(s) for s in WCFG.shapes])
    assert [r[2].split()[0] for r in cells] == [pope_answer(r) for r in replies]
