"""Latency of the side-by-side demo (12_demo): one question, answered by both models, through `gradio_client`.

Launches the app on 127.0.0.1, uploads a Shapes world scene with the caption prompt, and measures, per request:
  0. the handler called directly, without HTTP (what the two models cost), in the main thread and in a worker
     thread as the server runs it: on a busy 2-core machine torch's two OpenMP threads can make a tiny model's
     generation far slower in the main thread, so the two numbers can differ a lot;
  1. one client, `--n` requests one after another (median and 90th percentile);
  2. `--clients` clients at once, each sending requests until `--n` have been answered in all.
By default the models are the course's (the base model and the best aligned one, trained on first use); pass
checkpoint folders with --left / --right. The numbers depend on the machine: run it where you report it.

    python bench/demo_latency.py                    # the course's models
    python bench/demo_latency.py --left F --right G # two checkpoint folders
"""
import os
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import argparse, platform, socket, statistics, tempfile, threading, time
from pathlib import Path

import torch
from gradio_client import Client, handle_file

from vlmcourse.world import CAPTION_PROMPT, WorldConfig, render, sample_scenes
from vlmcourse.demo import build_app, launch_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def timed_ask(client, image, prompt) -> float:
    t0 = time.perf_counter()
    left, right, _ = client.predict(handle_file(image), None, prompt, api_name="/ask")
    assert isinstance(left, list) and isinstance(right, list)
    return time.perf_counter() - t0


def summary(lat: list) -> str:
    q = statistics.quantiles(lat, n=10) if len(lat) >= 10 else [max(lat)] * 9
    return f"median {1000 * statistics.median(lat):7.1f} ms   p90 {1000 * q[8]:7.1f} ms   ({len(lat)} requests)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--left", default=None, help="left model folder or Hub id (default: the course's base model)")
    ap.add_argument("--right", default=None, help="right model folder or Hub id (default: the course's best aligned model)")
    ap.add_argument("--n", type=int, default=50, help="requests per measurement")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients in the second measurement")
    ap.add_argument("--prompt", default=CAPTION_PROMPT, help="the question asked")
    a = ap.parse_args()

    wcfg = WorldConfig()
    image = Path(tempfile.mkdtemp()) / "scene.png"
    render(sample_scenes(wcfg, 1, seed=0, kind="counter")[0], wcfg).save(image)
    app = build_app(a.left, a.right)
    sbs = app.side_by_side
    t0 = time.perf_counter()
    for slot in sbs.slots.values(): slot.get()  # load (or train) both models before timing
    print(f"models loaded in {time.perf_counter() - t0:.1f} s\n{sbs.status().replace('**', '').replace('  ', '')}")
    def direct(out):  # the handler alone, without HTTP: the models' share of a request
        for k in range(a.n + 3):
            t0 = time.perf_counter(); sbs.ask(str(image), None, a.prompt)
            if k >= 3: out.append(time.perf_counter() - t0)
    in_main, in_worker = [], []
    direct(in_main)
    w = threading.Thread(target=direct, args=(in_worker,)); w.start(); w.join()  # where the server runs handlers
    url = launch_app(app, port=free_port(), block=False)
    try:
        client = Client(url, verbose=False)
        for _ in range(3): timed_ask(client, str(image), a.prompt)  # warm-up
        seq = [timed_ask(client, str(image), a.prompt) for _ in range(a.n)]

        lat, lock, done = [], threading.Lock(), [0]
        def worker():
            c = Client(url, verbose=False)
            while True:
                with lock:
                    if done[0] >= a.n: return
                    done[0] += 1
                t = timed_ask(c, str(image), a.prompt)
                with lock: lat.append(t)
        threads = [threading.Thread(target=worker) for _ in range(a.clients)]
        t0 = time.perf_counter()
        for t in threads: t.start()
        for t in threads: t.join()
        wall = time.perf_counter() - t0
    finally:
        app.close()

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"device {next(sbs.slots['left'].get()[0].parameters()).device}")
    print(f"prompt: {a.prompt!r}; one request = an upload + both models' answers")
    print(f"handler, main thread:       {summary(in_main)}")
    print(f"handler, worker thread:     {summary(in_worker)}   (the server runs handlers in worker threads)")
    print(f"1 client, sequential:       {summary(seq)}   {a.n / sum(seq):.1f} requests/s")
    print(f"{a.clients} concurrent clients:       {summary(lat)}   {len(lat) / wall:.1f} requests/s")


if __name__ == "__main__":
    main()
