"""Does end-to-end training localise tumour better than a frozen or precomputed encoder? Measured.

    python -m experiments.localisation --root=runs/localisation                 # train, then measure
    python -m experiments.localisation --root=runs/localisation --phase=measure # measure what finished

One generated PANDA-like data set (with its label masks) is tiled once into ``<root>/store``; every
(encoder, seed) run trains on that same store with the quick preset (``experiments.panda``, one
subprocess each, resumable: a run with results.json is not trained again), seeds outermost so that
an interrupted study still has whole seeds. ``measure`` restores each run's best checkpoint, scores
every tile of the val and test slides (``bigjax.train.predict``) and reports the localisation AUC
(``bigjax.metrics.localisation``) of each tile score the aggregator has (attention, and the instance
scores of mean/max pooling or DTFD's tile CAMs) against the masks: per run and score the mean over
slides with its 95 % bootstrap interval, per encoder and score the mean and spread over seeds.
Results go to ``<root>/localisation.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np

from bigjax.errors import ArgumentParser, run_cli
from bigjax.logs import quiet_libraries

ENCODERS = ("big", "frozen", "precomputed", "local")


def parse_flags(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/localisation", help="study folder (data, store, runs)")
    p.add_argument("--phase", choices=["all", "train", "measure"], default="all")
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=ENCODERS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3, help="training epochs per run (the quick preset has 5)")
    p.add_argument("--n_slides", type=int, default=96)
    p.add_argument("--modules", type=int, default=4, help="local mode's K")
    p.add_argument("--extra", default="", help="more experiments.panda flags for every run (tests: tiny sizes)")
    p.add_argument("--side", type=int, nargs=2, default=(384, 640), help="generated slide side range (px)")
    p.add_argument("--tile_size", type=int, default=32)
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def prepare(a: argparse.Namespace) -> Path:
    """Generate the data set with masks and tile it once (both skipped when done)."""
    from bigjax.data import layouts
    from bigjax.data.synthetic import make_panda_like
    from bigjax.data.tiling import TilingConfig, tile_dataset

    root = Path(a.root)
    data = root / "data"
    if not (data / "train.csv").is_file():
        make_panda_like(data, n_slides=a.n_slides, seed=0, side=tuple(a.side), workers=2)
    store = root / "store"
    if not (store / "manifest.csv").is_file():
        tile_dataset(layouts.panda_layout(data, seed=0), store, TilingConfig(tile_size=a.tile_size),
                     workers=2, progress=not a.no_progress)
    return store


def run_dir(a: argparse.Namespace, encoder: str, seed: int) -> Path:
    return Path(a.root) / "runs" / f"{encoder}_s{seed}"


def train_all(a: argparse.Namespace, store: Path) -> None:
    """Every (seed, encoder) run not yet finished, one ``experiments.panda`` subprocess each."""
    for seed in a.seeds:
        for encoder in a.encoders:
            workdir = run_dir(a, encoder, seed)
            if (workdir / "results.json").is_file():
                continue
            cmd = [sys.executable, "-m", "experiments.panda", f"--workdir={workdir}", f"--store={store}",
                   f"--encoder={encoder}", f"--seed={seed}", f"--epochs={a.epochs}", "--eval_draws=0",
                   *(["--resume"] if (workdir / "checkpoints").is_dir() else []),
                   *([f"--modules={a.modules}"] if encoder == "local" else []),
                   *(["--no_progress"] if a.no_progress else []), *a.extra.split()]
            logging.info("training %s", " ".join(cmd[1:]))
            subprocess.run(cmd, check=True)


def measure(a: argparse.Namespace, store: Path) -> dict:
    """Localisation AUC of each finished run on the val and test slides, and its summary per encoder."""
    from bigjax.data.masks import mask_path, tile_tumour_fraction
    from bigjax.data.manifest import read_manifest, select
    from bigjax.data.store import TileStore

    tiles = TileStore(store)
    rows = [r for r in select(read_manifest(store / "manifest.csv")) if r.split in ("val", "test")]
    truth = {}
    for r in rows:
        size = tiles.meta(r.slide_id)["tile_size"] * tiles.meta(r.slide_id)["downsample"]
        truth[r.slide_id] = tile_tumour_fraction(mask_path(r.source, r.slide_id), tiles.coords(r.slide_id), size)
    out = {"slides": len(rows), "runs": {}, "encoders": {}, "not_finished": []}
    for encoder in a.encoders:
        means: dict[str, list[float]] = {}
        for seed in a.seeds:
            workdir = run_dir(a, encoder, seed)
            if not (workdir / "results.json").is_file():
                out["not_finished"].append(workdir.name)
                continue
            out["runs"][workdir.name] = _measure_run(workdir, tiles, rows, truth)
            for kind, loc in out["runs"][workdir.name]["scores"].items():
                means.setdefault(kind, []).append(loc["auc"])
        if means:
            out["encoders"][encoder] = {kind: {"mean": float(np.mean(m)), "std": float(np.std(m)), "seeds": len(m)}
                                        for kind, m in means.items()}
    (Path(a.root) / "localisation.json").write_text(json.dumps(out, indent=1, default=str))
    return out


def _measure_run(workdir: Path, tiles, rows, truth: dict) -> dict:
    """One run's localisation (kept in ``<run>/localisation.json``; measured again only for another
    best checkpoint)."""
    from bigjax.models.mil import scores as mil_scores
    from bigjax.train import predict, prediction_files

    saved = workdir / "localisation.json"
    model = predict.load_run(workdir)
    cached = json.loads(saved.read_text()) if saved.is_file() else {}
    if cached.get("step") == model.best_step and "scores" in cached:  # older files kept only the default score
        return cached
    results = [predict.slide_scores(model, tiles, r) for r in rows]
    kinds = mil_scores.informative_scores(model.model.head)
    result = {"scores": prediction_files.localisations(results, truth, kinds), "step": model.best_step,
              "results": json.loads((workdir / "results.json").read_text())}
    saved.write_text(json.dumps(result, indent=1, default=str))
    return result


def table(out: dict) -> str:
    """The markdown table of docs/results.md."""
    lines = ["| encoder | seed | tile score | localisation AUC [95 % CI over slides] | slides | test QWK, all tiles |",
             "|---|---|---|---|---|---|"]
    for name, r in out["runs"].items():
        encoder, seed = name.rsplit("_s", 1)
        qwk = next((x[len("test QWK "):] for x in r["results"]["lines"] if x.startswith("test QWK")), "")
        for kind, loc in r["scores"].items():
            lo, hi = loc["ci95"]
            lines.append(f"| {encoder} | {seed} | {kind} | {loc['auc']:.3f} [{lo:.3f}, {hi:.3f}] | {loc['slides']} "
                         f"| {qwk} |")
    lines += ["", "| encoder | tile score | mean ± std over seeds | seeds |", "|---|---|---|---|"]
    lines += [f"| {e} | {kind} | {s['mean']:.3f} ± {s['std']:.3f} | {s['seeds']} |"
              for e, kinds in out["encoders"].items() for kind, s in kinds.items()]
    if out["not_finished"]:
        lines += ["", "not finished: " + ", ".join(out["not_finished"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_flags(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    quiet_libraries()
    store = prepare(a)
    if a.phase in ("all", "train"):
        train_all(a, store)
    if a.phase in ("all", "measure"):
        print(table(measure(a, store)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
