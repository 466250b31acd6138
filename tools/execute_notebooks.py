"""Execute the lessons at full size and save their outputs into the notebooks, so that a reader of GitHub or the docs
site sees every figure, table and number without running anything. Prints each notebook's wall time (the bar: at most
3 minutes each on a 2-core machine with the models cached).

    python tools/execute_notebooks.py                      # every notebook of nbs/
    python tools/execute_notebooks.py nbs/03_hallucination.ipynb ...

Cells flagged as nbdev_test skips them (settings.ini's tst_flags: slow, gpu, hub) are skipped here too and keep no
output; `IN_TEST` is not set, so each lesson runs at its full size. The notebook is written only when every cell ran,
and then cleaned with nbdev_clean (which keeps outputs: settings.ini has clear_all = False), so CI's cleanliness check
still passes."""
import argparse, configparser, os, re, subprocess, sys, time
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell

ROOT = Path(__file__).resolve().parents[1]


def skip_flags() -> set:
    ini = configparser.ConfigParser()
    ini.read(ROOT / "settings.ini")
    return set(ini["DEFAULT"].get("tst_flags", "").split())


def directives(source: str) -> set:
    return {w for line in source.splitlines() if line.startswith("#|") for w in line[2:].split()}


WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")  # "file:line: FutureWarning: ..." as Python's warnings print it


BAR = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")  # a tqdm bar: "  0%|          | 0/1 [00:00<?, ?it/s]"


def drop_library_warnings(nb):
    "Remove the warnings and progress bars libraries print to stderr (they name this machine's paths, or only say how fast it was)."
    for cell in nb.cells:
        outs = []
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream" and o.get("name") == "stderr":
                lines, keep, skip = "".join(o["text"]).splitlines(keepends=True), [], False
                for line in lines:
                    if WARNING.match(line):
                        skip = True
                        continue
                    if skip and line.startswith(" "): continue  # the source line a warning quotes
                    if BAR.search(line): continue  # a library's progress bar (e.g. transformers' "Writing model shards")
                    skip = False
                    keep.append(line)
                if not "".join(keep).strip(): continue
                o["text"] = keep
            outs.append(o)
        if "outputs" in cell: cell["outputs"] = outs


def execute(path: Path, flags: set) -> float:
    nb = read_nb(path)
    def skip(cell):
        if cell.cell_type != "code": return True
        if flags & directives(cell.source):
            cell.outputs = []
            return True
        return "nbdev_export(" in cell.source
    t0, cwd = time.time(), os.getcwd()
    os.chdir(path.parent)
    try: CaptureShell(path).run_all(nb, exc_stop=True, preproc=skip)
    finally: os.chdir(cwd)
    seconds = time.time() - t0
    drop_library_warnings(nb)
    write_nb(nb, path)
    return seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path)
    a = ap.parse_args()
    os.environ.pop("IN_TEST", None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    nbs = [p.resolve() for p in a.notebooks] or sorted((ROOT / "nbs").glob("[0-9]*.ipynb"))
    flags, times = skip_flags(), {}
    for p in nbs:
        print(f"{p.name}: running", flush=True)
        try: times[p.name] = execute(p, flags)
        except Exception as e:
            print(f"{p.name}: FAILED, left as it was: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
            times[p.name] = float("nan")
            continue
        print(f"{p.name}: {times[p.name]:.0f} s", flush=True)
    subprocess.run(["nbdev_clean"], cwd=ROOT, check=True)
    print("\n| notebook | seconds (full size, models cached) |\n| --- | --- |")
    for k, v in times.items(): print(f"| {k} | {v:.0f} |")
    if any(v != v for v in times.values()): sys.exit(1)


if __name__ == "__main__":
    main()
