"Shared by the demo tests: a free port and the tiny checkpoint folders the app is launched with."
import socket
import torch
from vlmcourse.world import WorldConfig
from vlmcourse.llava import BaseTrainConfig, build_processor, build_vlm, save_vlm, train_base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


# stage 0 and stage 1's lookups of a tiny test config: a few steps, so that the code runs in seconds, not minutes
TINY_TEXT = dict(copy_steps=2, lookup_steps=2, stage1_lookups=16)


def tiny_checkpoints(root):
    "A briefly trained model in `root/prior` and an untrained one in `root/untrained`: seconds, not minutes."
    torch.manual_seed(0)
    model, proc, _ = train_base(BaseTrainConfig(stage1_captions=640, stage2_steps=5, clip_init=False, **TINY_TEXT), progress=False)
    save_vlm(model, proc, root / "prior")
    proc = build_processor(WorldConfig())
    save_vlm(build_vlm(proc, seed=1), proc, root / "untrained")
    return root


def yes_sayer(folder):
    "A model trained for 40 steps on presence questions only: it answers 'yes .' to them (about 2 s)."
    torch.manual_seed(0)
    model, proc, _ = train_base(BaseTrainConfig(stage1_captions=640, stage2_steps=40, presence_frac=1.0, caption_frac=0.0,
                                                clip_init=False, **TINY_TEXT), progress=False)
    save_vlm(model, proc, folder)
    return folder
