"""The numbers the lessons' prose quotes from a config are the config's: each phrase below is rendered from the config
that sets it and must appear, word for word, in the lesson's markdown. Change a config and this test names the sentence to
update (numbers that a lesson measures are printed by its cells, not typed)."""
import json
from pathlib import Path

import pytest

from vlmcourse.clip import ClipTrainConfig
from vlmcourse.dpo import DPOTrainConfig
from vlmcourse.instructblip import InstructBlipModelConfig, InstructTuneConfig
from vlmcourse.llava import BaseTrainConfig
from vlmcourse.pixelllm import PixelTrainConfig
from vlmcourse.preference import AlignConfig, counter_frac_runs
from vlmcourse.rl import GRPOTrainConfig
from vlmcourse.world import NUMBER_WORDS

NBS = Path(__file__).resolve().parents[1] / "nbs"
B, D, A = BaseTrainConfig(), DPOTrainConfig(), AlignConfig()
def sci(x): return f"{x:.0e}".replace("e-0", "e-")  # 5e-5, as the prose writes a rate


SWEEP = next(iter(counter_frac_runs().values())).train  # every run of 07's sweep trains with these

PHRASES = [
    ("01_clip", f"a batch of {ClipTrainConfig().batch_size} pairs"),
    ("02_llava", f"{B.stage1_captions:,} captions"),
    ("02_llava", f"{B.caption_frac:.0%} captions, {B.presence_frac:.0%}\n   presence questions"),
    ("02_llava", f"{1 - B.caption_frac - B.presence_frac:.0%} colour, position and count questions"),
    ("04_instructblip", f"Soft prompts from {InstructBlipModelConfig().num_query_tokens} queries, through {B.model.text_layers} frozen layers, "
                        f"were enough for counts and presence in {InstructTuneConfig().steps} steps"),
    ("04_instructblip", f"(the course's base model needs {B.stage2_steps})"),
    ("05_dpo", f"$\\beta = {D.beta}$, learning rate {sci(D.lr)}, {NUMBER_WORDS[D.epochs]} epochs, {D.batch_size} pairs a step"),
    ("07_preference", f"on {A.n_pairs} pairs for {NUMBER_WORDS[A.train.epochs]} epochs"),
    ("07_preference", f"{A.n_pairs} pairs (or chosen answers), {NUMBER_WORDS[SWEEP.epochs]} epochs, {SWEEP.batch_size}\nper step, "
                      f"learning rate {sci(SWEEP.lr)}"),
    ("09_plora", f"a tenth of the course's {B.stage2_steps} steps"),
    ("09_plora", f"our {B.stage2_steps * B.batch_size:,} examples"),
    ("10_pixelllm", f"{PixelTrainConfig().steps} steps from the base model"),
    ("11_lavit", f"the base recipe's {B.stage2_steps} steps"),
    ("12_rl", f"({GRPOTrainConfig().max_steps} steps; 30 under `nbdev_test`)"),
]


def markdown(name: str) -> str:
    nb = json.loads((NBS / f"{name}.ipynb").read_text())
    return "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


@pytest.mark.parametrize("name,phrase", PHRASES, ids=[f"{n}: {p[:30]}" for n, p in PHRASES])
def test_prose_quotes_the_config(name, phrase):
    assert phrase in markdown(name), f"nbs/{name}.ipynb should say {phrase!r}, as its config does: update the sentence"
