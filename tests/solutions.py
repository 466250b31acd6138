"Solutions to the lessons' exercises: read them after trying. tests/test_exercises.py checks each with the lessons' own `check`."
import re

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


# 05_dpo
def ipo_one(pi_c, pi_r, ref_c, ref_r, tau, len_c, len_r):
    c, r = (pi_c - ref_c) / len_c, (pi_r - ref_r) / len_r
    return (c - r - 1 / (2 * tau)) ** 2


def margin_for_weight(w):
    import math
    return math.log((1 - w) / w)  # sigma(-h) = w  <=>  h = logit(1 - w)


# 06_pairs
def signal_left(t):
    import math
    ramp = [-6 + 12 * k / 999 for k in range(1000)]
    abar = 1.0
    for l in ramp[:t + 1]: abar *= 1 - (1 / (1 + math.exp(-l)) * (5e-3 - 1e-5) + 1e-5)
    return math.sqrt(abar)


def vcd_pick(logits, logits_contrast, alpha, cutoff):
    import math
    p = [math.exp(x - max(logits)) for x in logits]
    score = [(1 + alpha) * l - alpha * lc if pk >= cutoff * max(p) else -math.inf for l, lc, pk in zip(logits, logits_contrast, p)]
    return max(range(len(score)), key=score.__getitem__)


# 08_cal
def answer_weights(d, low, high):
    c = [min(max(x, low), high) for x in d]
    return [sum(c[max(0, t - 1):t + 2]) / len(c[max(0, t - 1):t + 2]) for t in range(len(c))]


def weighted_mean(ce, w):
    return sum(a * b for a, b in zip(ce, w)) / sum(w)


# 09_plora
def adapter_params(d_in, d_out, r):
    return r * (d_in + d_out)


def image_positions(input_ids, image_token_id):
    return [[t == image_token_id for t in row] for row in input_ids]


# 04_instructblip

def qformer_layer_params(d, f, dv):
    dense = lambda i, o: i * o + o  # a linear layer with bias
    ln = 2 * d  # a LayerNorm's gain and bias
    self_att = 4 * dense(d, d) + ln  # q, k, v, the output dense, its LayerNorm
    cross_att = dense(d, d) + 2 * dense(dv, d) + dense(d, d) + ln  # q from the queries, k and v from the image
    ffn = dense(d, f) + dense(f, d) + ln  # one feed-forward block
    return self_att + cross_att + 2 * ffn  # the queries' and the text's feed-forward


def first_colour(reply, colours):
    hits = [(m.start(), c) for c in colours for m in [re.search(rf"\b{re.escape(c)}\b", reply)] if m]
    return min(hits)[1] if hits else ""


# 07_preference
def gap_closed(run, base, oracle):
    return (run - base) / (oracle - base)


def welch_t(x, y):
    import statistics
    return (statistics.mean(x) - statistics.mean(y)) / (statistics.variance(x) / len(x) + statistics.variance(y) / len(y)) ** 0.5


# 13_demo
def asked_object(prompt):
    if not re.match(r"\s*(is there|are there|do you see|can you see)\b", prompt, re.I): return None
    named = {m.object for m in find_objects(prompt, SHAPES)}
    return named.pop() if len(named) == 1 else None


def valid_seed(x):
    if isinstance(x, bool) or not isinstance(x, (int, float)): return False
    return float(x).is_integer() and 0 <= x <= 2**32 - 1


# 14_real_models
def pope_strict(reply):
    words = reply.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def plural_of(word):
    return word + ("es" if word.endswith(("s", "x", "z", "ch", "sh")) else "s")


# 10_pixelllm
def mean_point_error(pred, target, mask):
    errors = [abs(p[c] - t[c]) for p, t, m in zip(pred, target, mask) if m for c in (0, 1)]
    return sum(errors) / len(errors)


def cell_index(x, y, image_size, grid):
    step = image_size / grid
    col, row = (min(max(int(v // step), 0), grid - 1) for v in (x, y))
    return row * grid + col


# 12_rl
def caption_reward(named, truth, w_named, w_invented):
    named = set(named)
    return w_named * len(named & set(truth)) - w_invented * len(named - set(truth))


def group_advantage(rewards):
    import statistics
    m, sd = statistics.mean(rewards), statistics.stdev(rewards)
    return [(r - m) / (sd + 1e-4) for r in rewards]


# 11_lavit
def perplexity_of(ids, K):
    import math
    ids = [i for i in ids if i >= 0]
    counts = [ids.count(k) for k in range(K)]
    return math.exp(-sum(c / len(ids) * math.log(c / len(ids)) for c in counts if c))


def sequence_length(keep, n_text):
    return 1 + sum(keep) + n_text  # <image>, one code per kept patch, the text
