"""The model's bare train step per dtype policy: what `train.mixed_precision` can gain on this CPU.

    python benchmarks/bench_step.py                              # batch 128, float32 vs bf16
    python benchmarks/bench_step.py --batch 32 --rounds 3 --policy float32 --policy mixed_bfloat16
    python benchmarks/bench_step.py --policy float32 --policy float32+xla   # XLA on this CPU?

One in-memory batch of the default model (params.yaml `model`), SGD, `train_on_batch` repeated:
no input pipeline, no validation; compiled without XLA as the train stage does on a CPU, or with
it where the policy is written `NAME+xla`. Each policy runs in a fresh process, alternating
A B A B, and the report gives the median images/s per policy and each one's ratio to the first.
It also prints whether the processor has native bfloat16 (`devices.native_bf16`: without it,
`mixed_precision: on` emulates bfloat16 and says so).
TensorFlow backend; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cli  # noqa: E402
import devices  # noqa: E402
from params import load_params  # noqa: E402


def child(variant: str, batch: int, steps: int) -> None:
    import keras
    import numpy as np

    from model import build_model

    policy, _, compiler = variant.partition("+")
    keras.mixed_precision.set_global_policy(policy)
    model = build_model(load_params(ROOT / "params.yaml").model, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="categorical_crossentropy",
                  jit_compile=compiler == "xla")  # without: the train stage's CPU choice
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, batch)]
    for _ in range(3):  # trace and warm up
        model.train_on_batch(images, labels)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(images, labels)
    print(json.dumps({"images_per_second": steps * batch / (time.perf_counter() - start)}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", action="append", help="Keras dtype policy, NAME+xla to "
                        "compile with XLA (repeatable; default: float32 and mixed_bfloat16)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.batch, args.steps)
        return
    policies = args.policy or ["float32", "mixed_bfloat16"]
    rates: dict[str, list[float]] = {policy: [] for policy in policies}
    for _ in range(args.rounds):
        for policy in policies:
            done = subprocess.run([sys.executable, __file__, "--child", policy, "--batch",
                                   str(args.batch), "--steps", str(args.steps)],
                                  capture_output=True, text=True, env=os.environ | {
                                      "KERAS_BACKEND": "tensorflow"})
            if done.returncode:
                raise cli.UserError(f"the {policy} run failed: {done.stderr.strip()[-500:]}")
            rates[policy].append(json.loads(done.stdout.strip().splitlines()[-1])
                                 ["images_per_second"])
    print(f"bench_step: {' '.join(sys.argv)}")
    print(f"  native bfloat16 ({', '.join(sorted(devices.NATIVE_BF16_FLAGS))}): "
          f"{devices.native_bf16()}; {os.cpu_count()} CPUs; batch {args.batch}, "
          f"{args.steps} steps x {args.rounds} rounds, fresh process per run")
    first = statistics.median(rates[policies[0]])
    for policy in policies:
        median = statistics.median(rates[policy])
        print(f"  {policy:15} {median:8.1f} img/s (per round: "
              f"{', '.join(f'{r:.1f}' for r in rates[policy])}), "
              f"{median / first:.2f}x {policies[0]}")


if __name__ == "__main__":
    cli.run("bench_step", main)
