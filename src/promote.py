"""Move the registered model's `champion` alias: to the best version by validation accuracy among
those within `tune.max_gap`, or to the version given (which is also how to roll back).

    python src/promote.py               # the best by validation accuracy, honest gap <= max_gap
    python src/promote.py --version 1   # that version (a rollback)
    python src/promote.py --dry-run     # say what would move, move nothing

Test accuracy is never read to choose. The registered model is `mlflow.experiment`'s name, in the
tracking store the pipeline uses (MLFLOW_TRACKING_URI, or the repository's mlflow.db).
"""

from __future__ import annotations

import argparse

import cli
import registry
import tracking
from params import load_params, parse_tune, read_yaml


def _line(version) -> str:
    tags = version.tags
    return (f"version {version.version} (val_accuracy {tags.get('val_accuracy', '?')}, "
            f"honest_gap {tags.get('honest_gap', '?')}, run {version.run_id})")


def promote(args: argparse.Namespace) -> str:
    params = load_params()
    name = params.mlflow.experiment
    tracking.use_store()
    if not registry.versions(name):
        raise cli.UserError(f"no registered model {name!r} in {tracking.store_uri()}"
                            ": run `dvc repro` first")
    if args.version is None:
        max_gap = parse_tune(read_yaml("params.yaml")).max_gap
        chosen = registry.best_version(name, max_gap)
        why = (f"best validation accuracy with honest gap <= tune.max_gap {max_gap}"
               if max_gap is not None else "best validation accuracy")
    else:  # a version that is not there is refused, by a dry run too
        chosen, why = registry.version(name, args.version), "as asked"
    before = registry.champion(name)
    if args.dry_run:
        if before is not None and str(before.version) == str(chosen.version):
            print(f"promote: {name}@{registry.ALIAS} would stay at {_line(before)} ({why})")
        else:
            print(f"promote: would move {name}@{registry.ALIAS} from "
                  f"{_line(before) if before else 'nowhere'} to {_line(chosen)} ({why})")
        return chosen.version
    before, after = registry.promote(name, chosen.version)
    if before is not None and before.version == after.version:
        print(f"promote: {name}@{registry.ALIAS} stays at {_line(after)} ({why})")
    else:
        print(f"promote: {name}@{registry.ALIAS} moved from "
              f"{_line(before) if before else 'nowhere'} to {_line(after)} ({why})")
    return after.version


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", type=int, help="move the alias to this version")
    parser.add_argument("--dry-run", action="store_true", help="say what would move only")
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli.run("promote", lambda: promote(parse_args()))
