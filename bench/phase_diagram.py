"""The phase diagram of 02_llava: counter-prior CHAIR_s and typical exact captions over (the alignment data's prior) x
(text-only captions relative to the alignment stage's examples), each cell trained with the course's recipe.

    python bench/phase_diagram.py --seeds 0 1 2 --write nbs/results/phase_diagram.csv
    python bench/phase_diagram.py --seeds 0 --procs 2        # one seed, two processes of one thread each
    python bench/phase_diagram.py --corners                  # only the 2 x 2 corner 02_llava's test cell reads

--corners trains the four points of `PHASE_CORNERS` at `PHASE_TEST_STEPS` alignment steps on seed 0 (about two
minutes each on one core) into the cache, where 02_llava's test cell finds them: tests/run.sh runs it beside
`vlmcourse train`.

Each point trains a base model from scratch (about four and a half minutes on one core): 9 cells x 3 seeds take about
two hours on two cores. Points run in --procs processes with one torch thread each; keep --procs at or below the free cores.
"""
import argparse, multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
import pandas as pd

def point(kwargs):
    import torch
    torch.set_num_threads(1)
    from vlmcourse.llava import phase_point
    return phase_point(**kwargs)

if __name__ == "__main__":
    from vlmcourse.llava import PHASE_CORNERS, PHASE_GRID, phase_table
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--procs", type=int, default=2, help="processes, one torch thread each")
    ap.add_argument("--write", default=None, help="write the points as CSV here")
    ap.add_argument("--corners", action="store_true", help="only 02_llava's 2 x 2 test corner (seed 0, PHASE_TEST_STEPS)")
    a = ap.parse_args()
    jobs = (PHASE_CORNERS if a.corners else [dict(align_prior=p, stage1_ratio=r, seed=s) for s in a.seeds
                                             for p in PHASE_GRID["align_prior"] for r in PHASE_GRID["stage1_ratio"]])
    with ProcessPoolExecutor(a.procs, mp_context=mp.get_context("spawn")) as pool:  # not daemonic: train_base starts a data worker
        points = []
        for fut in as_completed([pool.submit(point, j) for j in jobs]):
            pt = fut.result()
            points.append(pt)
            print(pt, flush=True)
            if a.write:
                Path(a.write).parent.mkdir(parents=True, exist_ok=True)
                pd.DataFrame(points).sort_values(["seed", "align_prior", "stage1_ratio"]).to_csv(a.write, index=False)  # after every point
    print(phase_table(points).round(3).to_string())
