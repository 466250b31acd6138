"Solutions to the lessons' exercises: read them after trying. tests/test_exercises.py checks each with the lessons' own `check`."
import torch
import torch.nn.functional as F

from vlmcourse.world import find_objects
from vlmcourse.hallucination import pope_answer

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")


# 00_world
def partner_rate(scenes, a, b):
    with_a = [s for s in scenes if a in s.shapes]
    return sum(b in s.shapes for s in with_a) / len(with_a)


def missing_partners_of(scene, cfg):
    return sorted({cfg.partner_of[s] for s in scene.shapes if s in cfg.partner_of} - scene.shapes)


# 01_clip
def recall_at_1(sim):
    return (sim.argmax(1) == torch.arange(len(sim))).float().mean().item()


def image_to_text_loss(u, v, t):
    logits = t.exp() * F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).T
    return F.cross_entropy(logits, torch.arange(len(u)))


# 02_llava
def image_tokens(image_size, patch_size, keep_cls):
    return (image_size // patch_size) ** 2 + int(keep_cls)


def scored(prompt_len, answer_len, width):
    return [0] * prompt_len + [1] * answer_len + [0] * (width - prompt_len - answer_len)


# 03_hallucination
def chair_s(captions, truths):
    return sum(any(m.object not in t for m in find_objects(c, SHAPES)) for c, t in zip(captions, truths)) / len(captions)


def pope_acc_yes(replies, labels):
    read = [pope_answer(r) for r in replies]
    return sum(r == l for r, l in zip(read, labels)) / len(labels), sum(r == "yes" for r in read) / len(read)
