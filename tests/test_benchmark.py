"""benchmarks/bench_train.py runs end to end on a tiny budget: generated images, no network.

It checks that the benchmark works, never how fast anything is.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    [], ["--set=train.backend=jax", "--set=augment.flip=true", "--set=augment.crop=4"]])
def test_benchmark_tiny_budget(tmp_path, settings):
    out = tmp_path / "bench.json"
    tiny_model = ["--set=model.filters=[8, 16, 16, 16]", "--set=model.dense_units=[16, 16]"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--images", "256",
         "--epochs", "2", "--rounds", "1", "--repo", str(tmp_path), "--json", str(out),
         *tiny_model, *settings], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    for kind in ("A", "B", "C"):
        assert data[kind]["images_per_second"]["median"] > 0
        assert len(data[kind]["runs"]) == 1
    assert len({run["policy"] for kind in "ABC" for run in data[kind]["runs"]}) == 1  # A's
    assert data["ratio_a_over_b"] > 0 and data["ratio_a_over_c_train_phase"] > 0
    assert data["input_pipeline"]["images_per_second"] > 0
    assert "skipped" in data["preprocess"]           # no --archive
    assert "no dvc.yaml" in data["dvc_repro"]["skipped"]  # tmp_path is no DVC repository
    assert "ratio A/B" in result.stdout and "ratio A/C" in result.stdout
    assert list(tmp_path.iterdir()) == [out]        # nothing written beside the JSON
    backend = "jax" if settings else "tensorflow"
    assert {run["backend"] for kind in "ABC" for run in data[kind]["runs"]} == {backend}
    assert data["config"]["augment"]["crop"] == (4 if settings else 0)
    assert data["config"]["model"]["dense_units"] == [16, 16]  # a list given by --set


def test_compare_seed_prints_both_curves(tmp_path):
    history = tmp_path / "history.csv"
    history.write_text("epoch,loss,accuracy,val_loss,val_accuracy,gap\n1,2.0,0.3,2.1,0.25,0.05\n")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"test_accuracy": 0.5, "honest_gap": 0.1}))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_seed.py"),
                             str(history), str(metrics)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[2] == "| 1 | 0.3389 | 0.3000 | 0.3188 | 0.2500 |"
    assert lines[51] == "| 50 | 0.9910 | - | 0.7757 | - |"
    assert "test accuracy: seed 0.7675, here 0.5000" in result.stdout


@pytest.mark.slow
def test_fidelity_ranks_configurations_under_the_preset(project):
    from conftest import sh

    sh("dvc", "repro", "preprocess", cwd=project)
    configs = project / "configs.yaml"
    configs.write_text("a: {overrides: {}, test_accuracy: 0.7, honest_gap: 0.2}\n"
                       "b: {overrides: {augment.flip: true}, test_accuracy: 0.8, "
                       "honest_gap: 0.1}\n"
                       "c: {overrides: {model.dropout: 0.3}, test_accuracy: 0.75, "
                       "honest_gap: 0.15}\n"
                       "d: {overrides: {}, test_accuracy: null, honest_gap: null}\n"
                       "e: {overrides: {}, test_accuracy: 0.9, honest_gap: 0.05, presets: ["
                       "{val_accuracy: 0.5, honest_gap: 0.1, epochs: 2, train_limit: 120, "
                       "source: a longer trial}, "
                       "{val_accuracy: 0.123, honest_gap: 0.045, epochs: 1, train_limit: 120, "
                       "source: a trial}]}\n"
                       "f: {overrides: {}, test_accuracy: 0.6, honest_gap: 0.3, presets: ["
                       "{val_accuracy: 0.123, honest_gap: 0.045, epochs: 2, train_limit: 120, "
                       "source: a longer trial}]}\n")
    out = project / "fidelity.json"
    script = str(ROOT / "benchmarks" / "fidelity.py")
    sh(sys.executable, script, str(configs), "--epochs", "1", "--train-limit", "120",
       "--only", "a", "--json", str(out), cwd=project)  # a first invocation, cut short
    (first,) = json.loads(out.read_text())["rows"]
    result = sh(sys.executable, script, str(configs),
                "--epochs", "1", "--train-limit", "120", "--json", str(out), cwd=project)
    assert "Spearman rank correlation over 5 configurations (all)" in result.stdout
    # the next one resumes it: a is not trained again
    assert f"fidelity: a: preset figures from {out}, an earlier invocation" in result.stdout
    assert "fidelity: e: preset figures from a trial" in result.stdout
    assert "fidelity: f: 1 epochs on 120 images" in result.stdout  # measured under another preset
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["a", "b", "c", "d", "e", "f"]
    assert rows["a"]["preset_val_accuracy"] == first["preset_val_accuracy"]
    assert rows["a"]["cpu_minutes"] == first["cpu_minutes"]
    assert all(0 <= row["preset_val_accuracy"] <= 1 for row in rows.values())
    assert (rows["e"]["preset_val_accuracy"], rows["e"]["preset_honest_gap"]) == (0.123, 0.045)
    assert rows["f"]["preset_val_accuracy"] != 0.123
    # what each trial cost, timed where it trained (e's figures came from elsewhere, untimed)
    assert rows["a"]["cpu_minutes"] > 0 and rows["a"]["wall_minutes"] > 0
    assert math.isnan(rows["e"]["cpu_minutes"])
    assert "cost per trial: " in result.stdout
    other = subprocess.run([sys.executable, script, str(configs), "--epochs", "2",
                            "--train-limit", "120", "--json", str(out)],
                           cwd=project, capture_output=True, text=True, timeout=300)
    assert other.returncode == 1
    assert other.stderr.strip().splitlines()[-1] == (
        f"fidelity: error: --json {out} holds 1 epochs on 120 images, not 2 on 120: name "
        "another file")
    assert len(json.loads(out.read_text())["rows"]) == 6  # left as it was
    # a limit over the split's size (or none) is all of it: a preset measured on all of it
    # under its number counts, nothing trains
    with np.load(project / "data" / "processed" / "train.npz") as arrays:
        size = len(arrays["labels"])
    configs.write_text(f"g: {{overrides: {{}}, test_accuracy: 0.6, honest_gap: 0.3, presets: ["
                       f"{{val_accuracy: 0.4, honest_gap: 0.05, epochs: 1, train_limit: {size}, "
                       f"source: all images}}]}}\n")
    everything = sh(sys.executable, script, str(configs), "--epochs", "1",
                    "--train-limit", str(size + 1000), cwd=project)
    assert "fidelity: g: preset figures from all images" in everything.stdout


def test_fidelity_ranks_accuracy_by_the_preset_s_gap_too(tmp_path):
    configs = tmp_path / "configs.yaml"
    measured = "epochs: 3, train_limit: 100, source: a trial"
    configs.write_text(  # presets measured: trains nothing
        f"a: {{overrides: {{}}, test_accuracy: 0.7, honest_gap: 0.3, presets: "
        f"[{{val_accuracy: 0.9, honest_gap: 0.25, {measured}}}]}}\n"
        f"b: {{overrides: {{}}, test_accuracy: 0.8, honest_gap: 0.2, presets: "
        f"[{{val_accuracy: 0.8, honest_gap: 0.05, {measured}}}]}}\n"
        f"c: {{overrides: {{}}, test_accuracy: 0.9, honest_gap: 0.1, presets: "
        f"[{{val_accuracy: 0.7, honest_gap: 0.1, {measured}}}]}}\n")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fidelity.py"),
                             str(configs), "--epochs", "3", "--train-limit", "100"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ("Spearman rank correlation over 3 configurations (all): accuracy -1.000, honest gap "
            "0.500, accuracy by the smallest preset gap 0.500\n") in result.stdout, result.stderr
    # gap growth 1.2, 4.0, 1.0
    assert ("honest gap growth from the preset to 50 epochs over 3 configurations (all): median "
            "1.20 (from 1.00 to 4.00)\n") in result.stdout


def test_fidelity_of_the_full_runs_stopped_early_trains_nothing(tmp_path):
    configs = tmp_path / "configs.yaml"
    configs.write_text("a: {overrides: {}, test_accuracy: 0.7, val_curve: {10: 0.6, 20: 0.65}}\n"
                       "b: {overrides: {}, test_accuracy: 0.8, val_curve: {10: 0.5, 20: 0.7}}\n"
                       "c: {overrides: {}, test_accuracy: 0.9, val_curve: {10: 0.4, 20: 0.8}}\n")
    script = str(ROOT / "benchmarks" / "fidelity.py")
    # read beside the repository's params.yaml, whose space none of these three is in
    early = subprocess.run([sys.executable, script, str(configs), "--stopped-at", "10"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "the runs stopped at epoch 10:\nSpearman rank correlation over 3 configurations " \
        "(all): accuracy -1.000\n" in early.stdout, early.stderr
    assert "(in tune.space)" not in early.stdout
    later = subprocess.run([sys.executable, script, str(configs), "--stopped-at", "20",
                            "--json", str(tmp_path / "out.json")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "(all): accuracy 1.000" in later.stdout, later.stderr
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [row["val_accuracy_at_k"] for row in rows] == [0.65, 0.7, 0.8]
    missing = subprocess.run([sys.executable, script, str(configs), "--stopped-at", "30"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == (
        "fidelity: error: --stopped-at 30: a has no val_curve entry for epoch 30 (it has "
        "[10, 20])")


@pytest.mark.parametrize(("args", "error"), [
    (["--epochs", "0"], "argument --epochs: '0' is not a whole number of at least 1"),
    (["--train-limit", "-5"], "argument --train-limit: '-5' is not a whole number of at least 1"),
    (["--stopped-at", "0"], "argument --stopped-at: '0' is not a whole number of at least 1"),
    (["--only", "recipe", "recipie"], "--only recipie: not in "),
])
def test_fidelity_refuses_bad_arguments_in_one_line(tmp_path, args, error):
    """A zero or negative count is refused (it once fell back to the default, or trained on
    all but the last images), and so is an unknown configuration, before anything trains."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert error in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_bench_step_compares_policies(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--batch", "8", "--steps",
         "1", "--rounds", "1", "--policy", "float32", "--policy", "mixed_bfloat16"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[1].startswith("  native bfloat16 (amx_bf16, avx512_bf16): ")
    assert lines[2].split()[0] == "float32" and lines[2].endswith("1.00x float32")
    assert lines[3].split()[0] == "mixed_bfloat16"
    assert list(tmp_path.iterdir()) == []  # writes nothing


@pytest.mark.slow
def test_seeds_runs_each_seed_as_an_experiment_and_reports_mean_and_sd(project):
    """benchmarks/seeds.py: one `dvc exp run` per seed at the pipeline's length; a rerun reads
    the finished seeds back instead of training them again."""
    import statistics

    from conftest import sh

    script = str(ROOT / "benchmarks" / "seeds.py")
    out = project / "seeds.json"
    # run as `.venv/bin/python benchmarks/seeds.py` without activating: dvc and the stages'
    # python come from the interpreter's environment, not from PATH
    first = sh(sys.executable, script, "--seeds", "3", "4", "--name", "flip",
               "-S", "augment.flip=true", "--json", str(out), cwd=project,
               PATH=os.defpath).stdout
    assert "dvc exp run -n flip-seed3 -S seed=3 -S augment.flip=true" in first
    results = json.loads(out.read_text())
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=project).stdout)
    experiments = {e["name"]: e["revs"][0]["data"] for b in shown for e in b["experiments"] or []}
    assert set(experiments) == {"flip-seed3", "flip-seed4"}
    for seed in (3, 4):
        data = experiments[f"flip-seed{seed}"]
        assert data["params"]["params.yaml"]["data"]["seed"] == seed
        assert data["params"]["params.yaml"]["data"]["augment"]["flip"] is True
        figures = data["metrics"]["reports/metrics.json"]["data"]
        assert results["seeds"][str(seed)]["test_accuracy"] == figures["test_accuracy"]
    gaps = [results["seeds"][s]["honest_gap"] for s in ("3", "4")]
    assert results["summary"]["honest_gap"]["mean"] == pytest.approx(statistics.fmean(gaps))
    assert results["summary"]["honest_gap"]["sd"] == pytest.approx(statistics.stdev(gaps))
    assert "| mean ± sd (n=2) |" in first
    again = sh(sys.executable, script, "--seeds", "3", "4", "--name", "flip",
               "-S", "augment.flip=true", cwd=project).stdout
    assert again.count("already run, its metrics read back") == 2
    refused = sh(sys.executable, script, "--seeds", "3", "-S", "seed=5", cwd=project, check=False)
    assert refused.returncode != 0 and "the seeds come from --seeds" in refused.stderr
    # the same name with another value of an override is another configuration: refused
    other = sh(sys.executable, script, "--seeds", "3", "--name", "flip",
               "-S", "augment.flip=false", cwd=project, check=False)
    assert other.returncode != 0 and other.stderr.strip().splitlines()[-1] == (
        "seeds: error: the experiment flip-seed3 exists with augment.flip true, not false: "
        "another --name runs this configuration")
    missing = sh(sys.executable, script, "--seeds", "3", "--best-params", "nowhere.yaml",
                 cwd=project, check=False)
    assert missing.returncode != 0 and missing.stderr.strip().splitlines() == [
        "seeds: error: --best-params nowhere.yaml: No such file or directory"]


def test_the_default_tune_preset_is_the_measured_one_that_ranks_best():
    """`tune.epochs` on `tune.train_limit` images is, of the presets measured in
    docs/fidelity/configs.yaml on every configuration a study can sample, the one whose short
    validation accuracy ranks them best as their 50-epoch runs' validation accuracy does
    (Spearman >= 0.8, the goal; chosen on validation, never on test accuracy), and
    `tune.gap_growth` is no more than the smallest growth of the honest gap measured from it to
    50 epochs: of points like those measured, the scaled limit drops none that would end within
    max_gap."""
    import importlib.util

    from params import parse_tune, read_yaml

    spec = importlib.util.spec_from_file_location("fidelity", ROOT / "benchmarks/fidelity.py")
    fidelity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fidelity)
    raw = read_yaml(ROOT / "params.yaml")
    tune = parse_tune(raw)
    configs = read_yaml(ROOT / "docs/fidelity/configs.yaml")
    inside = [name for name, config in configs.items()
              if fidelity.in_space(raw, config["overrides"], tune)]
    assert len(inside) >= 7
    measured: dict[tuple, list] = {}
    for name in inside:
        for preset in configs[name].get("presets") or []:
            measured.setdefault((preset["epochs"], preset["train_limit"]), []).append(
                {"short": preset["val_accuracy"], "full": configs[name]["val_accuracy"],
                 "growth": configs[name]["honest_gap"] / preset["honest_gap"]})
    spearman = {preset: pd.DataFrame(rows)["short"].corr(pd.DataFrame(rows)["full"], "spearman")
                for preset, rows in measured.items() if len(rows) == len(inside)}
    assert len(spearman) >= 3  # today's default and at least two candidates
    default = (tune.epochs, fidelity.trained_images(tune.train_limit, fidelity.split_size(raw)))
    assert default in spearman, f"{default} not measured on every configuration in the space"
    assert spearman[default] >= 0.8 and spearman[default] == max(spearman.values()), spearman
    assert tune.gap_growth <= min(row["growth"] for row in measured[default])
