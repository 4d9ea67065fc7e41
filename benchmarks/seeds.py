"""Re-run one configuration with several seeds through the pipeline; report mean and sd.

    python benchmarks/seeds.py --seeds 42 1 2 -S model.dropout=0.25 -S augment.flip=true ...
    python benchmarks/seeds.py --seeds 42 1 2 --best-params reports/best_params.yaml  # a winner
    python benchmarks/seeds.py --seeds 1 2 --name recipe -S ...   # names recipe-seed1, -seed2

Each seed is one `dvc exp run -n <name>-seed<N> -S seed=N -S ...` in the repository (run it
from the root), so every run is a DVC experiment and an MLflow run like any other: the
pipeline's length (`train.epochs`, all images) and its own training code. A seed whose
experiment already exists is not trained again: its metrics are read back (`dvc exp show`), so
an interrupted series resumes; an experiment of that name made with another seed or another
value of an override is refused in one line (another --name runs this configuration). Prints
each seed's test accuracy, honest gap and validation accuracy, then mean and standard deviation
(sample, n - 1) over the seeds; `--json FILE` also writes them. Like any `dvc exp run`, the
workspace is left at the last experiment (`dvc exp show` lists them all; `git checkout
params.yaml dvc.lock && dvc checkout` returns to the commit's run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # a script beside the stages, run without installing them

import atomic  # noqa: E402
from params import flatten  # noqa: E402

FIGURES = ("test_accuracy", "honest_gap", "val_accuracy")
# dvc, and the `python` of the stages it runs, from this interpreter's environment
ENV = os.environ | {"PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                             os.environ.get("PATH", "")])}


def overrides(args: argparse.Namespace) -> list[str]:
    sets = list(args.set)
    if args.best_params:
        try:
            best = flatten(YAML(typ="safe").load(Path(args.best_params).read_text()) or {})
        except OSError as error:
            raise SystemExit(f"seeds: error: --best-params {args.best_params}: "
                             f"{error.strerror or error}") from None
        sets = [f"{key}={json.dumps(value) if isinstance(value, bool) else value}"
                for key, value in best.items()] + sets
    if any(item.split("=", 1)[0] == "seed" for item in sets):
        raise SystemExit("seeds: error: -S seed=... : the seeds come from --seeds")
    return sets


def wanted(seed: int, sets: list[str]) -> dict:
    """The params an experiment of this seed must have: the seed and each `key=value`
    override, its value read as YAML as `dvc exp run -S` reads it."""
    out = {"seed": seed}
    for item in sets:
        key, _, value = item.partition("=")
        out[key] = YAML(typ="safe").load(value) if value else None
    return out


def finished(name: str) -> tuple[dict, dict] | None:
    """The params and metrics of a finished DVC experiment called `name`, if there is one."""
    shown = subprocess.run(["dvc", "exp", "show", "--json", "--all-commits"], check=True, env=ENV,
                           capture_output=True, text=True).stdout
    for baseline in json.loads(shown or "[]"):
        for experiment in baseline.get("experiments") or []:
            if experiment.get("name") != name:
                continue
            for revision in experiment.get("revs") or []:
                data = revision.get("data") or {}
                params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
                for found in (data.get("metrics") or {}).values():
                    figures = (found or {}).get("data") or {}
                    if all(key in figures for key in FIGURES):
                        return flatten(params), figures
    return None


def run_seed(name: str, seed: int, sets: list[str]) -> dict:
    known = finished(name)
    if known is not None:
        params, figures = known
        for key, value in wanted(seed, sets).items():
            if params.get(key, "absent") != value:
                raise SystemExit(f"seeds: error: the experiment {name} exists with {key} "
                                 f"{json.dumps(params.get(key, 'absent'))}, not "
                                 f"{json.dumps(value)}: another --name runs this configuration")
        print(f"seeds: {name}: already run, its metrics read back", flush=True)
        return figures
    command = ["dvc", "exp", "run", "-n", name, "-S", f"seed={seed}"]
    for item in sets:
        command += ["-S", item]
    print(f"seeds: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True, env=ENV)
    return json.loads(Path("reports/metrics.json").read_text())


def summary(results: dict[int, dict]) -> dict[str, dict[str, float]]:
    out = {}
    for key in FIGURES:
        values = [float(result[key]) for result in results.values()]
        out[key] = {"mean": statistics.fmean(values),
                    "sd": statistics.stdev(values) if len(values) > 1 else float("nan"),
                    "n": len(values)}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="seeds to run")
    parser.add_argument("--name", default="seeds", help="experiment name prefix")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a param of the configuration, as `dvc exp run -S` (repeatable)")
    parser.add_argument("--best-params", help="the configuration from a params file "
                        "(reports/best_params.yaml, as tune.py writes it)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"seeds: error: --seeds {' '.join(map(str, args.seeds))}: "
                         "a seed given twice")
    sets = overrides(args)
    results = {seed: run_seed(f"{args.name}-seed{seed}", seed, sets) for seed in args.seeds}
    print("| seed | test accuracy | honest gap | val. accuracy |")
    print("| --- | --- | --- | --- |")
    for seed, result in results.items():
        print(f"| {seed} | " + " | ".join(f"{float(result[key]):.4f}" for key in FIGURES) + " |")
    stats = summary(results)
    print(f"| mean ± sd (n={len(results)}) | " + " | ".join(
        f"{stats[key]['mean']:.4f} ± {stats[key]['sd']:.4f}" for key in FIGURES) + " |")
    if args.json:
        atomic.write_json(args.json, {"seeds": {str(k): {f: float(v[f]) for f in FIGURES}
                                                for k, v in results.items()},
                                      "summary": stats, "overrides": sets})
    return stats


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as error:
        print(f"seeds: error: {' '.join(error.cmd)} failed ({error.returncode})", file=sys.stderr)
        sys.exit(1)
