"""Every command of the README's Commands table runs, with tiny flags, as a user would type it.

The table is read from README.md. ``TINY`` holds, per command (the table's text, exactly), the flags
that make it small (one or a few steps on 16 px tiles of a shared generated store, tiny budgets) and
the file or line it must produce. A command in the table without an entry fails
``test_every_readme_command_has_tiny_flags``: adding a row means adding one line here. Placeholders
of the table (``PANDA``, ``resnet18.safetensors``, ``slides.csv``, ...) become files the session
fixture writes (``_substitute``).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ("--tile_size=16 --epochs=1 --batch_size=2 --tiles_per_bag=2 --accum=1 --eval_draws=1 "
         "--eval_tiles=2 --log_every=1 --no_progress")
GENERATED = TRAIN + " --store={store}"  # the generated-data commands train on the shared store
REAL = TRAIN + " --splits_csv={splits} --big_stages=1 --max_partition_bytes=400000"


@dataclass(frozen=True)
class Tiny:
    """How a README command runs small: flags appended (``{store}``... filled from the fixture),
    and what it must leave: a file under its workdir, or a line on stdout (``"stdout:..."``)."""

    flags: str
    expect: str = "results.json"


TINY = {
    "python -m experiments.panda --encoder=big": Tiny(GENERATED),
    "python -m experiments.panda --encoder=big --data_dir=PANDA --init=resnet18.safetensors": Tiny(REAL),
    "python -m experiments.panda --encoder=frozen --arch=uni --init=uni.safetensors": Tiny(GENERATED),
    "python -m experiments.panda --big_stages=auto --max_partition_bytes=auto": Tiny(
        GENERATED + " --device_memory=8GiB"),
    "python -m experiments.panda --encoder=big --host_dtype=bfloat16": Tiny(GENERATED),
    "python -m experiments.panda --encoder=big --big_engine=compiled": Tiny(GENERATED),
    "python -m experiments.panda --encoder=big --arch=vit_small_patch16 --compute_dtype=bfloat16 "
    "--max_partition_bytes=25165824": Tiny(GENERATED),
    "python -m experiments.panda --encoder=local --modules=4": Tiny(GENERATED),
    "python -m experiments.wholeslide [--data_dir=PANDA]": Tiny(
        "--n_slides=6 --epochs=1 --n_boot=10 --no_progress --workers=1", "stdout:"),
    "python -m experiments.panda --encoder=big --devices=4": Tiny(GENERATED),
    "python -m experiments.panda --encoder=inmemory --devices=4 --remat=block": Tiny(GENERATED),
    "python -m experiments.panda --encoder=inmemory --devices=2 --processes=2": Tiny(GENERATED),
    "python -m experiments.camelyon --csv=slides.csv": Tiny(TRAIN),
    "python -m experiments.tile --layout=panda --data_dir=PANDA --out=store": Tiny(
        "--tile_size=16 --splits_csv={splits} --workers=1", "store/manifest.csv"),
    "python -m experiments.benchmark --quick": Tiny("--shapes=1x32x32x3 --reps=1", "stdout:"),
    "python -m experiments.benchmark --sweep --out=runs/sweep": Tiny(
        "--sides=32,48 --configs=inmemory,big4 --reps=1", "runs/sweep/sweep.md"),
    "python -m bigjax.local.memory --side 3072 --modules 1,2,4,8": Tiny("--side 512 --modules 1,2", "stdout:"),
    "python -m bigjax.parallel.launch -n 2 -- MODULE ARGS": Tiny("", "stdout:"),
    "python -m experiments.seeds runs/results": Tiny("", "stdout:"),
    # --head_kernel=1: 192 px slides leave a 6x6 map, too small for the official 5x5/5 reducing conv
    "python -m experiments.wholeslide --mpp=0.5 --host_memory=8GiB --spill_dir=/tmp/spill": Tiny(
        "--n_slides=3 --side=192 --epochs=1 --n_boot=5 --modules=1 --no_progress --workers=1 --head_kernel=1",
        "log:run: spilled [0-9.]+ GiB written, [0-9.]+ GiB read, [0-9.]+ GB/s achieved, [0-9.]+ s waited on "
        "the disk; peak RSS [0-9.]+ GiB training, [0-9.]+ GiB evaluation"),
    "python -m bigjax.models.machine_fit": Tiny("--side 64", "stdout:"),
    "python -m experiments.predict --workdir=runs/panda": Tiny(
        "--no_progress --heatmap_side=128 --top_k=2 --out={workdir}/pred", "pred/predictions.csv"),
    "pytest -m slow": Tiny("", "slow suite: its subset run by .ci/run"),
}
NOT_RUN_HERE = {"pytest -m slow"}  # the heavy tests themselves: .ci/run runs their subset (SLOW_SUBSET)


def readme_commands() -> list[str]:
    """The first `code` span of each row of the README's Commands table."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Commands", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("|")][2:]  # header, rule
    return [re.search(r"`([^`]+)`", row.split("|")[2]).group(1) for row in rows]


def test_every_readme_command_has_tiny_flags():
    commands = readme_commands()
    assert len(commands) >= 15
    missing = [c for c in commands if c not in TINY]
    assert not missing, f"README commands without a TINY entry in {__file__}: {missing}"
    stale = [c for c in TINY if c not in commands]
    assert not stale, f"TINY entries for commands no longer in the README: {stale}"


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """A tiny PANDA folder (10 slides: 8 train, 1 val, 1 test), its store at 16 px, a torchvision
    ResNet-18 .safetensors, a CAMELYON-style CSV, and seed result folders."""
    from safetensors.numpy import save_file

    from bigjax.data import layouts
    from bigjax.data.synthetic import make_panda_like
    from bigjax.data.tiling import TilingConfig, tile_dataset
    from bigjax.models.resnet import ResNet
    from tests.models.test_resnet import _torch_names

    root = tmp_path_factory.mktemp("readme")
    panda = make_panda_like(root / "PANDA", n_slides=10, seed=0, side=(64, 96), workers=1)
    with open(panda / "train.csv") as f:
        rows = list(csv.DictReader(f))
    splits = ["train"] * 8 + ["val", "test"]
    (root / "splits.csv").write_text("image_id,split\n" + "".join(
        f"{r['image_id']},{s}\n" for r, s in zip(rows, splits)))
    slides = layouts.panda_layout(panda, splits_csv=root / "splits.csv")
    tile_dataset(slides, root / "store", TilingConfig(tile_size=16), progress=False)
    save_file(_torch_names(ResNet(18), np.random.default_rng(0)), str(root / "resnet18.safetensors"))
    with open(root / "slides.csv", "w") as f:  # binary labels: ISUP >= 3
        f.write("path,label,split,slide_id\n" + "".join(
            f"PANDA/train_images/{r['image_id']}.tiff,{int(int(r['isup_grade']) >= 3)},{s},{r['image_id']}\n"
            for r, s in zip(rows, splits)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-m", "experiments.panda", "--encoder=precomputed",
                    *shlex.split(GENERATED.format(store=root / "store")), f"--workdir={root / 'run'}"],
                   cwd=root, env=env, check=True, capture_output=True, timeout=900)  # for predict
    for seed in (0, 1):
        run = root / "results" / f"panda_s{seed}"
        run.mkdir(parents=True)
        q = 0.5 + seed / 10  # a results.json as bigjax.train.report writes it, cut to one row
        (run / "results.json").write_text(json.dumps({"results": [
            {"split": "test", "protocol": "all tiles", "values": {"qwk": [q]},
             "qwk_mean_std": [q, 0.0], "qwk_ci95": [q - 0.1, q + 0.1]}]}))
    return root


def _substitute(command: str, data: Path, workdir: Path) -> str:
    """The table's placeholders -> the fixture's files; the run's folder for outputs."""
    for old, new in (("[--data_dir=PANDA]", ""), ("--data_dir=PANDA", f"--data_dir={data / 'PANDA'}"),
                     ("resnet18.safetensors", str(data / "resnet18.safetensors")),
                     ("--arch=uni --init=uni.safetensors", "--arch=vit_small_patch16_224"),
                     ("slides.csv", str(data / "slides.csv")), ("runs/results", str(data / "results")),
                     ("--out=store", f"--out={workdir / 'store'}"),
                     ("--workdir=runs/panda", f"--workdir={data / 'run'}"),
                     ("--spill_dir=/tmp/spill", f"--spill_dir={workdir / 'spill'}"),
                     ("--out=runs/sweep", f"--out={workdir / 'runs/sweep'}"),
                     ("MODULE ARGS", "experiments.seeds " + str(data / "results"))):
        command = command.replace(old, new)
    return command


def _argv(command: str, tiny: Tiny, data: Path, workdir: Path) -> list[str]:
    argv = shlex.split(_substitute(command, data, workdir))
    argv += shlex.split(tiny.flags.format(store=data / "store", splits=data / "splits.csv", workdir=workdir))
    if argv[1] == "-m" and argv[2].startswith("experiments.") and argv[2] not in (
            "experiments.benchmark", "experiments.seeds", "experiments.tile", "experiments.predict"):
        argv.append(f"--workdir={workdir}")
    return [sys.executable, *argv[1:]] if argv[0] == "python" else argv


@pytest.mark.parametrize("command", [c for c in TINY if c not in NOT_RUN_HERE])
def test_readme_command_runs_with_tiny_flags(command, data, tmp_path):
    tiny = TINY[command]
    argv = _argv(command, tiny, data, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    if tiny.expect.startswith("log:"):  # a regex the run's log (stdout or stderr) must match
        assert re.search(tiny.expect[len("log:"):], done.stdout + done.stderr), done.stderr[-2000:]
    elif tiny.expect.startswith("stdout:"):
        assert tiny.expect[len("stdout:"):] in done.stdout and done.stdout.strip(), done.stdout[-2000:]
    else:
        assert (tmp_path / tiny.expect).exists(), sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("module", sorted({c.split()[2] for c in readme_commands() if c.startswith("python -m")}))
def test_every_readme_cli_refuses_a_flag_in_one_line(module, tmp_path):
    """A mistyped flag is one ``error:`` line and status 2, not argparse's usage block."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", module, "--no_such_flag"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("error: ") and line.endswith(" (--help lists the flags)")
    assert "--no_such_flag" in line or "are required" in line
