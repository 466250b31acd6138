"Checks of vlmcourse.preference: the run config, SFT on DPO's budget, alignment from a (tiny) base, the cache, the table."
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import numpy as np
import pandas as pd
import pytest
import torch

from vlmcourse.dpo import DPOTrainConfig, dpo_train
from vlmcourse.llava import BaseTrainConfig, build_processor, build_vlm
from helpers import TINY_TEXT
from vlmcourse.pairs import build_pairs
from vlmcourse.preference import (BEST_ALIGNMENT, AlignConfig, align, best_aligned_vlm, best_aligned_vlm_path,
                                  results_markdown, results_table, sft_train)
from vlmcourse.world import WorldConfig

WCFG = WorldConfig()
TINY_BASE = BaseTrainConfig(stage1_captions=64, stage2_steps=4, batch_size=8, clip_init=False, seed_tries=1, **TINY_TEXT)  # trains in a second or two


@pytest.fixture(scope="module")
def pairs():
    return build_pairs(None, None, WCFG, "bpo_inject", 20, seed=0, progress=False)


@pytest.fixture
def tiny_model():
    proc = build_processor(WCFG)
    return build_vlm(proc, seed=0), proc


@pytest.mark.parametrize("kw, match", [(dict(objective="ppo"), "objective"), (dict(source="web"), "source"), (dict(n_pairs=0), "n_pairs")])
def test_align_config_validates(kw, match):
    with pytest.raises(ValueError, match=match):
        AlignConfig(**kw)


def test_best_alignment_is_a_valid_config():
    assert isinstance(BEST_ALIGNMENT, AlignConfig)
    assert BEST_ALIGNMENT.base == BaseTrainConfig()  # it starts from the course's base model


def test_sft_has_dpo_budget(tiny_model, pairs):
    model, proc = tiny_model
    cfg = DPOTrainConfig(batch_size=8, epochs=2, lr=1e-3)
    h = sft_train(model, proc, pairs, cfg, progress=False)
    model2, _ = build_vlm(proc, seed=0), proc
    h2 = dpo_train(model2, proc, pairs, cfg, progress=False)
    assert h["steps"] == h2["steps"] == 2 * math.ceil(20 / 8)
    assert len(h["loss"]) == h["steps"]
    assert np.mean(h["loss"][-2:]) < np.mean(h["loss"][:2])  # it learns


def test_sft_reads_only_the_chosen_answers(pairs):
    proc = build_processor(WCFG)
    cfg = DPOTrainConfig(batch_size=8, epochs=1, lr=1e-3)
    swapped = pairs.map(lambda ex: {"rejected": [{"role": "assistant", "content": [{"type": "text", "text": "yes ."}]}]})
    a = sft_train(build_vlm(proc, seed=0), proc, pairs, cfg, progress=False)["loss"]
    b = sft_train(build_vlm(proc, seed=0), proc, swapped, cfg, progress=False)["loss"]
    np.testing.assert_allclose(a, b, rtol=1e-6)
    swapped_c = pairs.map(lambda ex: {"chosen": [{"role": "assistant", "content": [{"type": "text", "text": "yes ."}]}]})
    c = sft_train(build_vlm(proc, seed=0), proc, swapped_c, cfg, progress=False)["loss"]
    assert not np.allclose(a, c)


def test_align_from_a_tiny_base(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMCOURSE_CACHE", str(tmp_path))
    acfg = AlignConfig(base=TINY_BASE, n_pairs=12, train=DPOTrainConfig(batch_size=6, epochs=1, sft_weight=1.0))
    model, proc, hist = align(acfg, progress=False)
    assert hist["steps"] == 2 and hist["pairs"] == 12
    from vlmcourse.llava import base_vlm
    base, _ = base_vlm(TINY_BASE, progress=False)
    diff = sum((p - q).abs().sum().item() for p, q in zip(model.parameters(), base.parameters()))
    assert diff > 0  # trained away from the base
    sft_model, _, h = align(AlignConfig(objective="sft", base=TINY_BASE, n_pairs=12, train=acfg.train), progress=False)
    assert h["steps"] == 2
    wrong = build_pairs(None, None, WCFG, "bpo_inject", 5, progress=False)
    with pytest.raises(ValueError, match="budget"):
        align(acfg, pairs=wrong, progress=False)


def test_best_aligned_vlm_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMCOURSE_CACHE", str(tmp_path))
    acfg = AlignConfig(base=TINY_BASE, n_pairs=8, train=DPOTrainConfig(batch_size=8, epochs=1))
    p1 = best_aligned_vlm_path(acfg, progress=False)
    stamp = (p1 / "config.json").stat().st_mtime_ns
    model, proc = best_aligned_vlm(acfg=acfg, progress=False)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert best_aligned_vlm_path(acfg, progress=False) == p1 and (p1 / "config.json").stat().st_mtime_ns == stamp  # not retrained
    other = best_aligned_vlm_path(AlignConfig(base=TINY_BASE, n_pairs=8, seed=1, train=acfg.train), progress=False)
    assert other != p1  # another config, another model


def test_results_table_and_markdown():
    rows = [dict(run="base", seed=-1, **{"counter/chair_s": 0.2, "typical/exact": 0.9}),
            dict(run="A", seed=0, **{"counter/chair_s": 0.1, "typical/exact": 0.8}),
            dict(run="A", seed=1, **{"counter/chair_s": 0.3, "typical/exact": 1.0})]
    t = results_table(rows)
    assert list(t.index) == ["base", "A"]
    assert t.loc["A", ("mean", "counter/chair_s")] == pytest.approx(0.2)
    assert t.loc["A", ("std", "counter/chair_s")] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    assert t.loc["base", ("std", "typical/exact")] == 0
    md = results_markdown(t).splitlines()
    assert md[0].startswith("| run | seeds | counter CHAIR_s | typical exact |")
    assert md[2] == "| base | 1 | 0.200 | 0.900 |"
    assert md[3] == "| A | 2 | 0.200 ± 0.141 | 0.900 ± 0.141 |"


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SWEEP = ROOT / "nbs" / "results" / "counter_frac_sweep.csv"


def test_readme_and_landing_page_results_are_the_sweep_as_written_by_code():
    import json
    from vlmcourse.preference import sweep_markdown
    want = sweep_markdown(pd.read_csv(SWEEP)).strip()
    index = "".join("".join(c["source"]) for c in json.loads((ROOT / "nbs" / "index.ipynb").read_text())["cells"] if c["cell_type"] == "markdown")
    for page, text in (("README.md", (ROOT / "README.md").read_text()), ("nbs/index.ipynb", index)):
        section = text.split("<!-- results -->", 1)[1].split("<!-- /results -->", 1)[0]
        assert section.strip() == want, f"{page}'s results differ from the sweep: run 07_preference (or write_section) again"


def test_the_rule_picks_the_served_model_from_the_committed_sweep():
    from vlmcourse.preference import counter_frac_runs, pick_best
    assert counter_frac_runs()[pick_best(pd.read_csv(SWEEP))] == BEST_ALIGNMENT


def _sweep(rows):
    keys = ("counter/chair_s", "typical/exact", "typical_pope_adversarial/accuracy")
    return pd.DataFrame([dict(run=r, seed=s, **dict(zip(keys, figs))) for r, s, *figs in rows])


def test_pick_best_by_hand():
    from vlmcourse.preference import pick_best
    df = _sweep([("base", -1, 0.5, 1.0, 0.95), ("a", 0, 0.01, 0.95, 0.95), ("a", 1, 0.01, 0.97, 0.95),  # the lowest CHAIR_s, but 4 points of typical exact lost
                 ("b", 0, 0.10, 1.0, 0.94), ("b", 1, 0.06, 0.99, 0.94), ("c", 0, 0.09, 1.0, 0.95), ("c", 1, 0.09, 1.0, 0.95),
                 ("d", 0, 0.02, 1.0, 0.80), ("d", 1, 0.02, 1.0, 0.80),  # low CHAIR_s, but it answers presence questions worse on typical scenes
                 ("oracle", -1, 0.0, 1.0, 1.0)])
    assert pick_best(df) == "b"  # mean 0.08 < c's 0.09, typical exact 0.995 and POPE 0.94 within bounds; a and d are out, the oracle is no run
    assert pick_best(df, keep={"typical/exact": 0.05, "typical_pope_adversarial/accuracy": 0.02}) == "a"
    assert pick_best(df, keep={"typical/exact": 0.01}) == "d"  # without the POPE bound
    assert pick_best(df, prefix="c") == "c"
    with pytest.raises(ValueError, match="no run"):
        pick_best(df, keep={"typical/exact": 0.0}, prefix="a")
    with pytest.raises(ValueError, match="base"):
        pick_best(df[df.run != "base"])


def test_write_section_replaces_between_markers_and_refuses_without_them(tmp_path):
    from vlmcourse.preference import write_section
    f = tmp_path / "R.md"
    f.write_text("head\n<!-- results -->\nold\n<!-- /results -->\ntail\n")
    write_section(f, "results", "new\ntable")
    assert f.read_text() == "head\n<!-- results -->\nnew\ntable\n<!-- /results -->\ntail\n"
    f.write_text("no markers here\n")
    with pytest.raises(ValueError, match="markers"):
        write_section(f, "results", "x")
    assert f.read_text() == "no markers here\n" and [p.name for p in tmp_path.iterdir()] == ["R.md"]  # untouched, no stray file


def test_write_section_in_a_notebook_writes_the_markdown_cell(tmp_path):
    import json
    from vlmcourse.preference import write_section
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "source": ["x = 1"], "outputs": [], "execution_count": None},
                    {"cell_type": "markdown", "metadata": {}, "source": ["## R\n", "<!-- results -->\n", "old\n", "<!-- /results -->"]}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    f = tmp_path / "i.ipynb"
    f.write_text(json.dumps(nb))
    write_section(f, "results", "| a |")
    cells = json.loads(f.read_text())["cells"]
    assert "".join(cells[1]["source"]) == "## R\n<!-- results -->\n| a |\n<!-- /results -->" and cells[0]["source"] == ["x = 1"]
    with pytest.raises(ValueError, match="markdown cell"):
        write_section(f, "other", "x")


def test_add_gap_closed_measures_against_base_and_oracle():
    from vlmcourse.preference import add_gap_closed
    df = pd.DataFrame(dict(run=["base", "a", "b", "oracle"], **{"counter/chair_s": [0.5, 0.25, 0.5, 0.0], "pope_adversarial/accuracy": [0.6, 0.8, 1.0, 1.0]}))
    out = add_gap_closed(df)
    assert list(out["gap closed, counter CHAIR_s"]) == pytest.approx([0, 0.5, 0, 1])
    assert list(out["gap closed, POPE adversarial acc"]) == pytest.approx([0, 0.5, 1, 1])
    assert "gap closed, counter CHAIR_s" not in df  # the input is left as it was
    with pytest.raises(ValueError, match="oracle"):
        add_gap_closed(df[df.run != "oracle"])


def test_pool_runs_adds_only_the_run_seed_pairs_not_yet_held(tmp_path):
    from vlmcourse.preference import pool_runs
    mine = pd.DataFrame(dict(run=["base", "a", "a"], seed=[-1, 0, 1], x=[1.0, 2.0, 3.0]))
    pd.DataFrame(dict(run=["base", "a", "a", "b"], seed=[-1, 1, 2, 2], x=[9.0, 9.0, 4.0, 5.0])).to_csv(tmp_path / "o.csv", index=False)
    out = pool_runs(mine, [tmp_path / "o.csv"])
    assert list(zip(out.run, out.seed, out.x)) == [("base", -1, 1.0), ("a", 0, 2.0), ("a", 1, 3.0), ("a", 2, 4.0), ("b", 2, 5.0)]
    assert len(pool_runs(mine, [tmp_path / "o.csv"], skip=())) == 5  # base -1 is held already either way
    assert len(pool_runs(pd.DataFrame(), [tmp_path / "o.csv"], skip=())) == 4  # an empty start takes every row
