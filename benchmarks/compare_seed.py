"""Print a run's per-epoch accuracy beside the original write-up's, as a Markdown table.

    python benchmarks/compare_seed.py reports/history.csv [reports/metrics.json]

docs/seed_history.csv holds the per-epoch figures of the original 50-epoch run, copied from its
training log (Keras' `acc`/`val_acc`); its test accuracy was 0.7675.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

SEED = Path(__file__).resolve().parents[1] / "docs" / "seed_history.csv"
SEED_TEST_ACCURACY = 0.7675


def table(history: pd.DataFrame, seed: pd.DataFrame) -> str:
    merged = seed.merge(history, on="epoch", how="left", suffixes=("_seed", ""))
    lines = ["| epoch | train acc. seed | train acc. here | val. acc. seed | val. acc. here |",
             "| --- | --- | --- | --- | --- |"]
    for row in merged.itertuples():
        here = ("-", "-") if pd.isna(row.accuracy) else (f"{row.accuracy:.4f}",
                                                         f"{row.val_accuracy:.4f}")
        lines.append(f"| {row.epoch} | {row.accuracy_seed:.4f} | {here[0]} | "
                     f"{row.val_accuracy_seed:.4f} | {here[1]} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    history = pd.read_csv(argv[0])
    print(table(history, pd.read_csv(SEED)))
    if len(argv) > 1:
        metrics = json.loads(Path(argv[1]).read_text())
        print(f"\ntest accuracy: seed {SEED_TEST_ACCURACY:.4f}, "
              f"here {metrics['test_accuracy']:.4f}; honest gap here {metrics['honest_gap']:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
