"""experiments.predict / bigjax.train.predict on a tiny trained run: files, resume, one-line errors,
and the report in a real headless browser."""
import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bigjax.data.masks import mask_path
from bigjax.data.layouts import SlideEntry
from bigjax.data.manifest import NO_LABEL, read_manifest
from bigjax.errors import Interrupted, run_cli
from bigjax.train import predict as predict_lib
from bigjax.train.config import TrainConfig
from bigjax.train.loop import train
from bigjax.train.optim import OptimizerConfig
from bigjax.train.predict import PredictOptions, predict
from experiments import predict as predict_cli

SMALL = PredictOptions(heatmap_side=64, top_k=2, progress=False)


def _train(store, workdir, aggregator="abmil"):
    """A run trained one epoch on the tiny store (precomputed encoder)."""
    train(TrainConfig(workdir=str(workdir), store=str(store), encoder="precomputed", epochs=1, batch_size=2,
                      tiles_per_bag=4, optim=OptimizerConfig(lr=1e-3, accum=1), val_draws=1, val_tiles=4,
                      eval_draws=0, embed_chunk=16, aggregator=aggregator, progress=False))
    return workdir


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """An ABMIL run trained one epoch on the tiny store."""
    return _train(store, tmp_path_factory.mktemp("run"))


def _masks(store):
    rows = read_manifest(store / "manifest.csv")
    return {r.slide_id: (mask_path(r.source, r.slide_id), "radboud") for r in rows}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predictions_scores_heatmaps_report(trained, store, tmp_path):
    out = tmp_path / "pred"
    summary = predict(trained, store=store, split="test", out=out, masks=_masks(store), options=SMALL)
    rows = _rows(out / "predictions.csv")
    assert list(rows[0]) == ["slide_id", "prediction", *(f"p_{c}" for c in range(6)), "confidence", "n_tiles",
                             "score", "label", "correct"]
    assert len(rows) == 2 == summary["slides"]
    for row in rows:
        probs = np.array([float(row[f"p_{c}"]) for c in range(6)])
        assert abs(probs.sum() - 1) < 1e-5 and row["prediction"] == str(probs.argmax())
        assert row["correct"] == str(int(row["prediction"] == row["label"]))
        tiles = _rows(out / "tiles" / f"{row['slide_id']}.csv")
        assert len(tiles) == int(row["n_tiles"]) and {"y", "x", "size", "attention", "tumour_fraction"} <= set(tiles[0])
        assert abs(sum(float(t["attention"]) for t in tiles) - 1) < 1e-3
        assert (out / "heatmaps" / f"{row['slide_id']}.png").is_file()
    assert set(summary["metrics"]) == {"QWK", "accuracy"} and list(summary["localisation"]) == ["attention"]
    page = (out / "report.html").read_text()
    assert re.search(r"Localisation of tumour.*<td>attention</td><td class='num'>(\d\.\d{3}|nan)</td>", page)
    assert "http" not in page.replace("http-equiv", "") and page.count("data:image/") == 4  # 2 thumbs, 2 heatmaps


def test_localisation_of_every_score_kind():
    """One localisation per tile-score kind: 1 for a score equal to the mask, about 0.5 for noise."""
    from bigjax.train.prediction_files import SlideScores, localisations

    rng = np.random.default_rng(0)
    results, fractions = [], {}
    for i in range(20):
        fraction = (rng.random(200) < 0.3).astype(float)
        results.append(SlideScores(f"s{i}", np.ones(2) / 2, np.zeros((200, 2), int), 16.0,
                                   {"instance": fraction + 0.1, "attention": rng.random(200)}))
        fractions[f"s{i}"] = fraction
    results.append(SlideScores("no_mask", np.ones(2) / 2, np.zeros((3, 2), int), 16.0,
                               {"instance": np.ones(3), "attention": np.ones(3)}))
    found = localisations(results, fractions, ["instance", "attention"])
    assert list(found) == ["instance", "attention"]
    assert found["instance"] == {"auc": 1.0, "ci95": (1.0, 1.0), "slides": 20, "slides_with_mask": 20}
    lo, hi = found["attention"]["ci95"]
    assert abs(found["attention"]["auc"] - 0.5) < 0.05 and lo < 0.5 < hi and hi - lo < 0.1


@pytest.mark.slow
def test_max_pooling_reports_instance_and_attention_localisation(store, tmp_path):
    """A head with instance scores: its tile CSVs, summary and report carry each kind's localisation."""
    run = _train(store, tmp_path / "max", aggregator="max")
    out = tmp_path / "pred"
    summary = predict(run, store=store, split="test", out=out, masks=_masks(store), options=SMALL)
    assert summary["score"] == "instance" and list(summary["localisation"]) == ["instance", "attention"]
    for loc in summary["localisation"].values():
        assert loc["slides_with_mask"] == 2 and (np.isnan(loc["auc"]) or loc["ci95"][0] <= loc["auc"] <= loc["ci95"][1])
    tiles = _rows(out / "tiles" / f"{_rows(out / 'predictions.csv')[0]['slide_id']}.csv")
    assert {"instance", "attention", *(f"instance_logits_{c}" for c in range(6))} <= set(tiles[0])
    assert all(0 <= float(t["instance"]) <= 1 for t in tiles)
    page = (out / "report.html").read_text()
    assert page.count("<tr><td>instance</td>") == 1 and page.count("<tr><td>attention</td>") == 1


def test_new_slides_without_labels_are_tiled_with_the_runs_settings(trained, store, tmp_path):
    rows = read_manifest(store / "manifest.csv")[:2]
    entries = [SlideEntry(r.slide_id, Path(r.source), NO_LABEL, "test") for r in rows]
    out = tmp_path / "pred"
    summary = predict(trained, entries=entries, out=out, options=SMALL)
    assert summary["metrics"] == {} and "localisation" not in summary
    assert json.loads((out / "store" / "tiling.json").read_text())["tile_size"] == 16  # the run's tiles
    predicted = _rows(out / "predictions.csv")
    assert [r["slide_id"] for r in predicted] == [r.slide_id for r in rows]
    assert all(r["label"] == "" and r["correct"] == "" for r in predicted)
    assert "no labels: no metrics" in (out / "report.html").read_text()


def test_labels_file_gives_slides_labels_correctness_and_metrics(trained, store, tmp_path, capsys):
    """--slides with --labels: predictions.csv gets label and correct, the report its metrics."""
    rows = read_manifest(store / "manifest.csv")[:3]
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"{r.slide_id},{(r.label + 1) % 6}\n" for r in rows[:2]))
    out = tmp_path / "pred"
    argv = ["--workdir", str(trained), "--slides", *(r.source for r in rows), "--labels", str(labels),
            "--out", str(out), "--no_heatmaps", "--no_progress"]
    assert run_cli(predict_cli.main, argv) == 0
    assert re.search(r"QWK -?\d\.\d{3} \[95% CI", capsys.readouterr().out)
    predicted = {r["slide_id"]: r for r in _rows(out / "predictions.csv")}
    for r in rows[:2]:  # the file's labels, not the store's
        given = predicted[r.slide_id]
        assert given["label"] == str((r.label + 1) % 6)
        assert given["correct"] == str(int(given["prediction"] == given["label"]))
    assert predicted[rows[2].slide_id]["label"] == "" == predicted[rows[2].slide_id]["correct"]
    assert "Confusion matrix" in (out / "report.html").read_text()
    labels.write_text("slide_id,label\n" + "".join(f"{r.slide_id},7\n" for r in rows))
    err = _fail([*argv[:-4], "--out", str(tmp_path / "refused")], capsys)
    assert err == (f"error: --labels={labels}, line 2, column label: '7' is not a class of this run "
                   "(one of 0, 1, 2, 3, 4, 5)")
    assert not (tmp_path / "refused").exists()  # refused before any work


def test_interrupted_prediction_resumes_with_the_slides_done(trained, store, tmp_path, monkeypatch):
    out = tmp_path / "pred"
    with pytest.raises(Interrupted, match="stopped after 1 of 2 slides"):
        predict(trained, store=store, split="test", out=out, options=SMALL, should_stop=lambda: True)
    calls = []
    original = predict_lib.slide_scores
    monkeypatch.setattr(predict_lib, "slide_scores", lambda *a: calls.append(a[2].slide_id) or original(*a))
    predict(trained, store=store, split="test", out=out, options=SMALL)
    assert len(calls) == 1 and len(_rows(out / "predictions.csv")) == 2


def test_interrupted_tiling_resumes_with_the_slides_tiled(trained, store, tmp_path, monkeypatch):
    """A Ctrl-C while new slides are tiled stops after the current few; the rerun tiles only the rest."""
    rows = read_manifest(store / "manifest.csv")[:3]
    entries = [SlideEntry(r.slide_id, Path(r.source), NO_LABEL, "test") for r in rows]
    monkeypatch.setattr(predict_lib, "TILE_CHUNK", 2)
    out = tmp_path / "pred"
    with pytest.raises(Interrupted, match="stopped after tiling 2 of 3 slides"):
        predict(trained, entries=entries, out=out, options=SMALL, should_stop=lambda: True)
    assert len(list((out / "store" / "slides").iterdir())) == 2 and not (out / "predictions.csv").exists()
    tiled = []
    original = predict_lib.tile_dataset
    monkeypatch.setattr(predict_lib, "tile_dataset", lambda e, *a, **k: tiled.append(len(e)) or original(e, *a, **k))
    predict(trained, entries=entries, out=out, options=SMALL)
    assert tiled == [2, 1, 3] and len(_rows(out / "predictions.csv")) == 3


def _fail(argv, capsys):
    status = run_cli(predict_cli.main, [*argv, "--no_progress"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_inputs_are_one_line(trained, tmp_path, capsys):
    bad = tmp_path / "bad.tiff"
    bad.write_bytes(b"not a slide at all")
    assert "not a TIFF" in _fail(["--workdir", str(trained), "--slides", str(bad), "--out", str(tmp_path / "o")], capsys)
    empty = tmp_path / "untrained"
    empty.mkdir()
    shutil.copy(trained / "config.json", empty / "config.json")
    assert "no best checkpoint" in _fail(["--workdir", str(empty)], capsys)
    assert "holds no run" in _fail(["--workdir", str(tmp_path / "nowhere")], capsys)
    mean = tmp_path / "mean"
    mean.mkdir()
    config = json.loads((trained / "config.json").read_text())
    (mean / "config.json").write_text(json.dumps({**config, "aggregator": "mean"}))
    err = _fail(["--workdir", str(mean), "--score", "attention"], capsys)
    assert re.search(r"aggregator mean has no attention to draw .*--score=instance", err)
    assert "--score=cam" in _fail(["--workdir", str(trained), "--score", "cam"], capsys)
    for flag, message in [("--alpha=1.5", "--alpha=1.5: must be in 0..1"), ("--blur=-1", "--blur=-1.0: must be >= 0"),
                          ("--cmap=nope", "--cmap=nope: not a matplotlib colour map")]:
        assert message in _fail(["--workdir", str(tmp_path / "nowhere"), flag], capsys)  # before the run is read
    small = tmp_path / "small"
    small.mkdir()
    tifffile.imwrite(small / "tiny.tiff", np.full((12, 40, 3), 200, np.uint8), photometric="rgb")
    err = _fail(["--workdir", str(trained), "--slides", str(small / "tiny.tiff"), "--out", str(tmp_path / "o")], capsys)
    assert err == f"error: slide {small / 'tiny.tiff'}: level 0 is 40 x 12 px, smaller than one 16 px tile of the run"


def test_cli_error_in_a_subprocess_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.predict", f"--workdir={tmp_path}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: --workdir {tmp_path} holds no run (no config.json; it has: nothing)"], result.stderr


@pytest.mark.slow
def test_cli_tiles_new_slides_and_the_report_loads_in_chromium(trained, store, tmp_path):
    """The whole command on a PANDA-layout folder, then report.html in headless Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    out = tmp_path / "pred"
    result = subprocess.run([sys.executable, "-m", "experiments.predict", f"--workdir={trained}",
                             f"--data_dir={store.parent / 'data'}", f"--out={out}", "--no_progress",
                             "--heatmap_side=96", "--blur=0.5"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "12 slides predicted" in result.stdout and "localisation AUC" in result.stdout
    page = out / "report.html"
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", "<script>window.addEventListener('load',()=>{"
                     "const i=[...document.images];document.body.dataset.images=i.length;"
                     "document.body.dataset.broken=i.filter(x=>!x.complete||x.naturalWidth===0).length})"
                     "</script></body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert 'data-images="24"' in dom and 'data-broken="0"' in dom  # 12 thumbnails + 12 heatmaps
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # text, tables and images: not blank


def test_localisation_study_measures_the_finished_runs(trained, store, tmp_path, capsys):
    """experiments.localisation --phase=measure on a study folder holding one finished run."""
    from experiments import localisation

    (tmp_path / "runs").mkdir()
    (tmp_path / "store").symlink_to(store)
    (tmp_path / "data").symlink_to(store.parent / "data")
    (tmp_path / "runs" / "precomputed_s0").symlink_to(trained)
    assert localisation.main([f"--root={tmp_path}", "--phase=measure", "--encoders", "precomputed", "big",
                              "--seeds", "0"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"\| precomputed \| 0 \| attention \| (\d\.\d{3}|nan) \[", table)
    assert "not finished: big_s0" in table
    saved = json.loads((tmp_path / "localisation.json").read_text())
    assert saved["slides"] == 4 and list(saved["runs"]["precomputed_s0"]["scores"]) == ["attention"]
