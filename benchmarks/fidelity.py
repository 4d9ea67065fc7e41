"""Does the tuning preset rank configurations as their 50-epoch runs do?

    python benchmarks/fidelity.py          # docs/fidelity/configs.yaml, the tune preset
    python benchmarks/fidelity.py CONFIGS.yaml --epochs 10 --train-limit 20000 --json out.json
    python benchmarks/fidelity.py --stopped-at 30   # the full runs themselves, stopped early

Needs the preprocessed data (`dvc repro preprocess`). Every configuration in CONFIGS.yaml (name:
{overrides: {params key: value}, test_accuracy, honest_gap}, the last two from its 50-epoch run)
trains as one of `tune.py`'s trials would: `tune.epochs` epochs on the first `tune.train_limit`
training images, its own full schedule; a configuration with an entry in its `presets` list
(val_accuracy, honest_gap, epochs, train_limit, source) measured under the same preset, as a
study's trial of it is, is not trained again. The overrides apply to params.yaml as it is in the
working directory: run it where params.yaml holds the defaults, not after `dvc exp run` has
applied an experiment to the workspace. The script prints each one's validation accuracy and honest
gap under the preset beside its 50-epoch figures, its cost (CPU and wall minutes), whether a
study of today's `tune.space` can sample it, and the Spearman rank correlations of preset
validation accuracy with 50-epoch test accuracy and with 50-epoch validation accuracy (what a
preset is chosen on), of the two gaps, and of the preset's gap
(smallest first) with 50-epoch test accuracy (what a multi-objective study's `--front-end gap`
confirms from), over all configurations and over those inside the space (the ranking a study's
trials depend on), and how much the honest gap grows from the preset to 50 epochs (the median
ratio: what `tune.gap_growth` holds). It asserts nothing.

`--json FILE` is written after each configuration and read back by the next invocation: the
configurations it holds (measured under the same preset) are not trained again, so a run killed
part-way resumes where it stopped.

`--stopped-at K` trains nothing: it ranks the configurations by their own 50-epoch run's
validation accuracy at epoch K (`val_curve` in CONFIGS.yaml), what a study of full-length trials
sees when it stops (prunes) them there; K/50 of a full run's cost, no honest gap (that needs the
stopped model).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # a script beside the stages, run without installing them

import pandas as pd  # noqa: E402

import atomic  # noqa: E402
import cifar  # noqa: E402
import cli  # noqa: E402
from cifar import TRAIN_IMAGES, Split, load_split  # noqa: E402
from params import flatten, parse_params, parse_tune, read_yaml, with_overrides  # noqa: E402
from search_space import as_sampled  # noqa: E402


def preset_scores(raw: dict, overrides: dict, epochs: int, limit: int | None) -> dict:
    """A trial of the configuration under the preset: its scores, and its cost in minutes of
    CPU time (this process, all threads) and of wall time. Keras loads here, the first time a
    configuration trains (the backend params.yaml names): what configs.yaml holds is read in
    seconds."""
    import backend  # noqa: F401  (first: sets KERAS_BACKEND from params.yaml)

    # isort: split

    import keras

    from fitting import fit
    from scoring import final_scores

    cpu, wall = time.process_time(), time.monotonic()
    params = parse_params(with_overrides(raw, {**overrides, "train.epochs": epochs}))
    train = load_split(params.paths.processed, "train")
    val = load_split(params.paths.processed, "val")
    if limit:
        train = Split(train.images[:limit], train.labels[:limit])
    result = fit(params, train, val)
    val_accuracy, gap = final_scores(result, train, params.evaluate.batch_size)
    keras.backend.clear_session()
    return {"preset_val_accuracy": val_accuracy, "preset_honest_gap": gap,
            "cpu_minutes": (time.process_time() - cpu) / 60,
            "wall_minutes": (time.monotonic() - wall) / 60}


def split_size(raw: dict) -> int:
    """The training split's size: the preprocessed one's, or, before `dvc repro preprocess`,
    the official archive's less `data.val_size`."""
    params = parse_params(raw)
    if not (Path(params.paths.processed) / "train.npz").is_file():
        return TRAIN_IMAGES - params.data.val_size
    return cifar.split_size(params.paths.processed, "train")


def trained_images(limit: int | None, total: int) -> int:
    """How many images a trial under `limit` trains on: the first `limit`, all `total` where
    `limit` is empty or larger, so that `train_limit: 40000` and an empty one name the same
    preset."""
    return min(limit or total, total)


def in_space(raw: dict, overrides: dict, tune) -> bool:
    """Whether a study over `tune.space` can sample the configuration: every space key's value
    (params.yaml's where the configuration does not set it) lies in the space."""
    params = flatten(with_overrides(raw, overrides))
    point = as_sampled({key: params[key] for key in tune.space}, tune)
    return all(tune.contains(key, value) for key, value in point.items())


def measured_preset(config: dict, epochs: int, limit: int | None) -> dict | None:
    """The entry of a configuration's `presets` measured under this preset, if any."""
    for preset in config.get("presets") or []:
        if (preset["epochs"], preset["train_limit"]) == (epochs, limit):
            return preset
    return None


def positive(text: str) -> int:
    """An argument that counts epochs or images: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="?", default=str(ROOT / "docs/fidelity/configs.yaml"))
    parser.add_argument("--epochs", type=positive, help="epochs per configuration (tune.epochs)")
    parser.add_argument("--train-limit", type=positive,
                        help="training images (tune.train_limit)")
    parser.add_argument("--only", nargs="*", help="names of the configurations to train")
    parser.add_argument("--stopped-at", type=positive, metavar="K",
                        help="train nothing: rank by each full run's val accuracy at epoch K")
    parser.add_argument("--json", help="also write the table to this JSON file (after each "
                        "configuration; one of the same preset is resumed)")
    args = parser.parse_args()
    if args.stopped_at is not None:
        return stopped_at(args)
    raw = read_yaml("params.yaml")
    tune = parse_tune(raw)
    epochs = args.epochs if args.epochs is not None else tune.epochs
    total = split_size(raw)
    limit = trained_images(args.train_limit if args.train_limit is not None
                           else tune.train_limit, total)
    configs = read_yaml(args.configs)
    unknown = sorted(set(args.only or ()) - set(configs))
    if unknown:
        raise cli.UserError(f"--only {' '.join(unknown)}: not in {args.configs} (it has "
                            f"{', '.join(configs)})")
    rows = []
    earlier = resumed(args.json, epochs, limit)
    written = dict(earlier)  # the --json file's rows by name: this run's replace earlier ones
    for name, config in configs.items():
        if args.only and name not in args.only:
            continue
        preset = measured_preset(config, epochs, limit)
        if name in earlier:
            print(f"fidelity: {name}: preset figures from {args.json}, an earlier invocation")
            scores = {key: earlier[name][key] for key in PRESET_COLUMNS}
        elif preset is None:
            print(f"fidelity: {name}: {epochs} epochs on {limit or 'all'} images", flush=True)
            scores = preset_scores(raw, config["overrides"], epochs, limit)
        else:
            print(f"fidelity: {name}: preset figures from {preset['source']}")
            scores = {"preset_val_accuracy": preset["val_accuracy"],
                      "preset_honest_gap": preset["honest_gap"],
                      "cpu_minutes": preset.get("cpu_minutes", math.nan),
                      "wall_minutes": preset.get("wall_minutes", math.nan)}
        rows.append({"name": name, **scores, "test_accuracy_50": config["test_accuracy"],
                     "val_accuracy_50": config.get("val_accuracy", math.nan),
                     "honest_gap_50": config["honest_gap"],
                     "in_space": in_space(raw, config["overrides"], tune)})
        written[name] = rows[-1]
        if args.json:  # after each configuration: a run killed later keeps it
            atomic.write_json(args.json, {"epochs": epochs, "train_limit": limit, "rows":
                                          pd.DataFrame(written.values()).to_dict("records")})
    table = pd.DataFrame(rows).set_index("name")
    print(table.to_string(float_format="%.4f"))
    report_spearman(table, {"accuracy": ("preset_val_accuracy", "test_accuracy_50"),
                            # what a preset is chosen on: validation, as a configuration is
                            "val accuracy": ("preset_val_accuracy", "val_accuracy_50"),
                            "honest gap": ("preset_honest_gap", "honest_gap_50"),
                            # the ranking a multi-objective study's gap end confirms from
                            "accuracy by the smallest preset gap":
                                ("preset_honest_gap", "test_accuracy_50", -1)})
    report_gap_growth(table, tune,
                      (epochs, limit) == (tune.epochs, trained_images(tune.train_limit, total)))
    if table["cpu_minutes"].notna().any():
        print(f"cost per trial: {table['cpu_minutes'].mean():.1f} CPU minutes, "
              f"{table['wall_minutes'].mean():.1f} wall minutes (mean over the trials timed)")


PRESET_COLUMNS = ("preset_val_accuracy", "preset_honest_gap", "cpu_minutes", "wall_minutes")


def resumed(path: str | None, epochs: int, limit: int | None) -> dict[str, dict]:
    """The rows an earlier invocation wrote to `path` (`--json`), by name: none where there is
    no such file. One written for another preset is an error: it is not this run's to resume
    or to overwrite."""
    if not path or not Path(path).exists():
        return {}
    earlier = json.loads(Path(path).read_text())
    if (earlier.get("epochs"), earlier.get("train_limit")) != (epochs, limit):
        raise cli.UserError(f"--json {path} holds {earlier.get('epochs')} epochs on "
                            f"{earlier.get('train_limit') or 'all'} images, not {epochs} on "
                            f"{limit or 'all'}: name another file")
    return {row["name"]: row for row in earlier.get("rows", [])}


def report_spearman(table: pd.DataFrame, pairs: dict[str, tuple]) -> None:
    """Spearman over every configuration, and over those a study of today's space can sample
    (the ranking a study's trials depend on). A pair is (proxy column, truth column[, sign]):
    sign -1 ranks by the proxy's smallest value first. A pair whose truth no configuration
    records (`val_accuracy` in an older CONFIGS.yaml) is left out."""
    pairs = {name: pair for name, pair in pairs.items()
             if pair[1] in table and table[pair[1]].notna().any()}
    for label, rows in (("all", table), ("in tune.space", table[table["in_space"]])):
        known = rows.dropna(subset=[column for pair in pairs.values() for column in pair[:2]])
        if len(known) < 3:
            continue
        figures = ", ".join(f"{name} {_spearman(known, *pair):.3f}"
                            for name, pair in pairs.items())
        print(f"Spearman rank correlation over {len(known)} configurations ({label}): {figures}")


def report_gap_growth(table: pd.DataFrame, tune, tune_preset: bool) -> None:
    """How much the honest gap grows from the preset to the 50-epoch run, the median ratio over
    every configuration and over those a study can sample: what `tune.gap_growth` is for (a
    study holds its short trials to `tune.max_gap` over it). `tune_preset`: whether the preset
    is the `tune` section's, the one `tune.gap_growth` is for."""
    for label, rows in (("all", table), ("in tune.space", table[table["in_space"]])):
        known = rows.dropna(subset=["preset_honest_gap", "honest_gap_50"])
        known = known[known["preset_honest_gap"] > 0]
        if known.empty:
            continue
        ratios = known["honest_gap_50"] / known["preset_honest_gap"]
        print(f"honest gap growth from the preset to 50 epochs over {len(known)} configurations "
              f"({label}): median {ratios.median():.2f} (from {ratios.min():.2f} to "
              f"{ratios.max():.2f})")
    if not tune_preset:
        print(f"tune.gap_growth ({tune.gap_growth}) is for the tune preset ({tune.epochs} "
              f"epochs on {tune.train_limit or 'all'} images), not this one")
        return
    print(f"tune.gap_growth {tune.gap_growth}: a study's short trials are held to "
          f"{tune.gap_limit}")
    if tune.trial_max_gap is None:
        return
    inside = table[table["in_space"]].dropna(subset=["preset_honest_gap"])
    within = inside[inside["preset_honest_gap"] <= tune.trial_max_gap]
    order = within.sort_values("preset_val_accuracy", ascending=False).index
    print(f"in tune.space within that limit, by preset val accuracy (the order a study confirms "
          f"them in): {', '.join(order) or 'none'}; over it: "
          f"{', '.join(inside.index.difference(within.index)) or 'none'}")


def _spearman(table: pd.DataFrame, proxy: str, truth: str, sign: int = 1) -> float:
    return sign * table[proxy].corr(table[truth], "spearman")


def stopped_at(args: argparse.Namespace) -> None:
    """The full runs stopped at epoch K as the proxy: their `val_curve` against their end."""
    raw = read_yaml("params.yaml")
    tune = parse_tune(raw)
    rows = []
    for name, config in read_yaml(args.configs).items():
        curve = config.get("val_curve") or {}
        if args.stopped_at not in curve:
            raise cli.UserError(f"--stopped-at {args.stopped_at}: {name} has no val_curve entry "
                                f"for epoch {args.stopped_at} (it has {sorted(curve)})")
        rows.append({"name": name, "val_accuracy_at_k": curve[args.stopped_at],
                     "test_accuracy_50": config["test_accuracy"],
                     "val_accuracy_50": config.get("val_accuracy", math.nan),
                     "in_space": in_space(raw, config["overrides"], tune)})
    table = pd.DataFrame(rows).set_index("name")
    print(table.to_string(float_format="%.4f"))
    print(f"the runs stopped at epoch {args.stopped_at}:")
    report_spearman(table, {"accuracy": ("val_accuracy_at_k", "test_accuracy_50"),
                            "val accuracy": ("val_accuracy_at_k", "val_accuracy_50")})
    if args.json:
        atomic.write_json(args.json, {"stopped_at": args.stopped_at,
                                      "rows": table.reset_index().to_dict("records")})


if __name__ == "__main__":
    cli.run("fidelity", main)
