"""Latency of the side-by-side demo (13_demo): one question, answered by both models, through `gradio_client`.

Launches the app on 127.0.0.1 and measures two paths, each with the caption prompt:
  - drawn: a Shapes world scene drawn by the app (`/new_scene`), asked about by its ground truth (no upload: what
    the browser does after 'Draw scene');
  - upload: the same scene as a PNG file, uploaded with every request.
For each path, per request:
  0. the handler called directly, without HTTP (what the two models cost), in the main thread and in a worker
     thread as the server runs it: on a busy 2-core machine torch's two OpenMP threads can make a tiny model's
     generation far slower in the main thread, so the two numbers can differ a lot;
  1. one client, `--n` requests one after another (median, 90th and 95th percentile);
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


def timed_ask(client, image, truth, prompt) -> float:
    t0 = time.perf_counter()
    left, right, _, msg = client.predict(handle_file(image) if image else None, truth, prompt, api_name="/ask")
    assert isinstance(left, list) and isinstance(right, list) and not msg, msg
    return time.perf_counter() - t0


def summary(lat: list) -> str:
    q = statistics.quantiles(lat, n=20) if len(lat) >= 20 else [max(lat)] * 19
    return f"median {1000 * statistics.median(lat):7.1f} ms   p90 {1000 * q[17]:7.1f} ms   p95 {1000 * q[18]:7.1f} ms   ({len(lat)} requests)"


def measure(url, sbs, image, truth, a) -> dict:
    "The four measurements of one path: the handler in the main thread and in a worker thread, 1 client, many clients."
    def direct(out):  # the handler alone, without HTTP: the models' share of a request
        for k in range(a.n + 3):
            t0 = time.perf_counter(); sbs.ask(image, truth, a.prompt)
            if k >= 3: out.append(time.perf_counter() - t0)
    in_main, in_worker = [], []
    direct(in_main)
    w = threading.Thread(target=direct, args=(in_worker,)); w.start(); w.join()  # where the server runs handlers
    client = Client(url, verbose=False)
    for _ in range(3): timed_ask(client, image, truth, a.prompt)  # warm-up
    seq = [timed_ask(client, image, truth, a.prompt) for _ in range(a.n)]
    lat, lock, done = [], threading.Lock(), [0]
    def worker():
        c = Client(url, verbose=False)
        while True:
            with lock:
                if done[0] >= a.n: return
                done[0] += 1
            t = timed_ask(c, image, truth, a.prompt)
            with lock: lat.append(t)
    threads = [threading.Thread(target=worker) for _ in range(a.clients)]
    t0 = time.perf_counter()
    for t in threads: t.start()
    for t in threads: t.join()
    return dict(in_main=in_main, in_worker=in_worker, seq=seq, lat=lat, wall=time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--left", default=None, help="left model: a course model's name, a folder or Hub id (default: base)")
    ap.add_argument("--right", default=None, help="right model: as --left (default: aligned, the best aligned model)")
    ap.add_argument("--n", type=int, default=50, help="requests per measurement")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients in the last measurement")
    ap.add_argument("--prompt", default=CAPTION_PROMPT, help="the question asked")
    ap.add_argument("--paths", default="drawn,upload", help="which paths to measure, comma-separated: drawn, upload")
    a = ap.parse_args()

    wcfg = WorldConfig()
    image = Path(tempfile.mkdtemp()) / "scene.png"
    render(sample_scenes(wcfg, 1, seed=0, kind="counter")[0], wcfg).save(image)
    app = build_app(a.left, a.right)
    sbs = app.side_by_side
    t0 = time.perf_counter()
    for name in sbs.default.values(): sbs.model(name)  # load (or train) both models before timing
    print(f"models loaded in {time.perf_counter() - t0:.1f} s\n{sbs.status().replace('**', '').replace(chr(92), '').replace('  ', '')}")
    url = launch_app(app, port=free_port(), block=False)
    results = {}
    try:
        for path in a.paths.split(","):
            if path == "drawn":
                _, truth, *_ = Client(url, verbose=False).predict(0, "counter", api_name="/new_scene")
                results[path] = measure(url, sbs, None, truth, a)
            elif path == "upload": results[path] = measure(url, sbs, str(image), None, a)
            else: raise SystemExit(f"unknown path {path!r}: use drawn and/or upload")
    finally:
        app.close()

    m = sbs.model(sbs.default["left"])
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"device {next(m.model.parameters()).device}")
    print(f"prompt: {a.prompt!r}; one request = both models' answers (drawn: the scene's truth is sent; upload: a PNG is uploaded)")
    for path, r in results.items():
        print(f"\n[{path}]")
        print(f"handler, main thread:       {summary(r['in_main'])}")
        print(f"handler, worker thread:     {summary(r['in_worker'])}   (the server runs handlers in worker threads)")
        print(f"1 client, sequential:       {summary(r['seq'])}   {a.n / sum(r['seq']):.1f} requests/s")
        print(f"{a.clients} concurrent clients:       {summary(r['lat'])}   {len(r['lat']) / r['wall']:.1f} requests/s")


if __name__ == "__main__":
    main()
