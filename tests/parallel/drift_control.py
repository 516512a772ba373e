"""The drift control of docs/results.md ("Encoder mesh"): is the mesh runs' drift round-off or a bug?

    PYTHONPATH=. python -m tests.parallel.drift_control [--steps 8] [--devices 4]

On the tiny run of the tests (tests/train/test_loop.tiny: in-memory ResNet-18, ABMIL, 2 bags of 5
tiles of 16 px per step, Adam lr 1e-4, no augmentation), prints per step the relative difference of
the step losses of

* ``mesh``: ``--devices=N`` against one device, free runs;
* ``reordered``: one device against one device with each bag's tiles reversed — the same step in
  exact arithmetic (BatchNorm over all tiles and attention pooling do not depend on the order),
  only the float32 summation order changes: the control;
* ``forced``: the mesh handed the one-device run's model and optimiser state before each step;

and, after one step from the same state, how many of the 11.5 M parameters the two updates move
apart by more than 0.1 lr (Adam's first step is about lr · sign(g)), for the mesh and the control.
"""

import argparse
import csv
import tempfile
from pathlib import Path

import jax


def _store(root: Path) -> Path:
    """The generated 16 px store of tests/train/conftest.py."""
    from bigjax.data import layouts
    from bigjax.data.synthetic import make_panda_like
    from bigjax.data.tiling import TilingConfig, tile_dataset
    from tests.train.conftest import SPLITS

    data = make_panda_like(root / "data", n_slides=len(SPLITS), seed=0, side=(64, 96), workers=1)
    with open(data / "train.csv") as f:
        ids = [row["image_id"] for row in csv.DictReader(f)]
    with open(root / "splits.csv", "w") as f:
        f.write("image_id,split\n" + "".join(f"{i},{s}\n" for i, s in zip(ids, SPLITS)))
    tile_dataset(layouts.panda_layout(data, splits_csv=root / "splits.csv"), root / "store",
                 TilingConfig(tile_size=16), progress=False)
    return root / "store"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--devices", type=int, default=4)
    opts = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", opts.devices)

    import numpy as np
    from flax import nnx

    import bigjax.parallel.mode  # noqa: F401  (registers the mesh modes)
    from bigjax.data.bags import Bag
    from bigjax.train.loop import Run
    from tests.train.test_loop import tiny

    root = Path(tempfile.mkdtemp(prefix="drift_"))
    store = _store(root)

    def batch(i, reverse=False):
        tiles = np.random.default_rng(i).integers(0, 255, size=(2, 5, 16, 16, 3), dtype=np.uint8)
        order = slice(None, None, -1 if reverse else 1)
        return [Bag(tiles=tiles[j][order].copy(), label=j, slide_id=f"s{j}",
                    indices=np.arange(5)[order].copy()) for j in range(2)]

    def run(name, devices):
        return Run(tiny(store, root / name, encoder="inmemory", devices=devices, accum=1, lr=1e-4))

    def params(r):
        return [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(r.model, nnx.Param))]

    def report(name, a, b):
        a, b = np.array(a), np.array(b)
        print(f"{name:10s}", " ".join(f"{x:.1e}" for x in np.abs(b - a) / np.abs(a)), flush=True)

    def moved_apart(a, b):
        return sum(int(np.sum(np.abs(x - y) > 1e-5)) for x, y in zip(params(a), params(b)))

    pairs = {"mesh": (run("m1", 1), run("mN", opts.devices), False),
             "reordered": (run("r1", 1), run("r2", 1), True)}
    print("relative step-loss difference, steps 1 ..", opts.steps)
    for name, (a, b, reverse) in pairs.items():
        la, lb = [], []
        for i in range(opts.steps):
            la.append(a.step(batch(i)))
            lb.append(b.step(batch(i, reverse)))
            if i == 0:
                apart = moved_apart(a, b)
        report(name, la, lb)
        print(f"{'':10s} after step 1: {apart} parameters apart by more than 0.1 lr", flush=True)
    a, b = run("f1", 1), run("fN", opts.devices)
    la, lb = [], []
    for i in range(opts.steps):
        for part in ("model", "optimizer"):
            nnx.update(getattr(b, part), nnx.state(getattr(a, part)))
        lb.append(b.step(batch(i)))
        la.append(a.step(batch(i)))
    report("forced", la, lb)


if __name__ == "__main__":
    main()
