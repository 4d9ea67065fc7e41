"""Benchmark of the train stage: the pipeline's `fitting.fit`, plain Keras and the step limit.

    python benchmarks/bench_train.py            # 4096 generated images, 3 epochs, 2 rounds
    python benchmarks/bench_train.py --images 256 --epochs 2 --rounds 1 --json bench.json  # smoke
    python benchmarks/bench_train.py --archive data/raw/cifar-10-binary.tar.gz --repo .
    python benchmarks/bench_train.py --set train.backend=jax --set train.batch_size=128 \
        --set augment.flip=true --set augment.crop=4    # any params key, as `dvc exp run -S`

Trains the default model (params.yaml `model`, `train.batch_size`) on the same images for the same
number of steps three ways, alternating A B C A B C, every run in a fresh child process (no state
leaks from one to the next, and each child's ru_maxrss is that run's peak memory):
  A  the pipeline: `fitting.fit` with params.yaml (and --set) shrunk to --epochs (its input
     pipeline and augmentation, the stage's precision / compilation / distribution choices,
     validation batch `train.batch_size`);
  B  plain Keras: `model.fit` on uint8 / one-hot numpy arrays, SGD(0.01), no augmentation, Keras
     defaults otherwise (validation batch = training batch);
  C  the step limit: the pipeline's compiled model (`fitting.compile_model`: its optimizer, loss
     and compilation) fitted on one in-memory batch repeated, no input pipeline, no validation.
All three run on `train.backend` in the precision A resolves (`devices.configure`: with
`mixed_precision: auto`, float32 on a CPU; `on`, bfloat16). The two ratios name the limit:
A's training phase over C (what the input pipeline and augmentation cost; goal >= 0.9) and A over
B, whole epochs (goal >= 1.0; with augmentation on, A does more work than B).
A Keras callback times each epoch from `on_epoch_begin` to `on_epoch_end` (training and validation)
and the training phase alone (up to `on_test_begin`). Throughput is training images per second over
epochs 2..E: the first epoch, which traces and compiles, is reported apart (used only when E is 1).
Then it times a checkpoint save and, in `side_costs.py`, the input pipeline alone (every batch of
`TrainBatches` in the parent process, the first one included, with nothing training), one epoch's
`mlflow.log_metrics` against a sqlite store in a temporary directory, `preprocess` of the archive
(with --archive) and a `dvc repro` with nothing to do (with --repo, when that pipeline is up to
date). It asserts nothing:
timings depend on the machine and on whatever else runs on it.

Images: the archive's training split (`cifar.read_archive` + `preprocess.split`, first --images of
it) and the first quarter as many of its validation images, or random uint8 images without one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # a script beside the stages, run without installing them
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import side_costs  # noqa: E402

import atomic  # noqa: E402
import cifar  # noqa: E402
import cli  # noqa: E402
import preprocess  # noqa: E402
from params import Params, parse_params, read_yaml, with_overrides  # noqa: E402

# TensorFlow is imported only inside functions: the parent holds no GPU while its children train.
KINDS = {"A": "pipeline fitting.fit", "B": "plain Keras fit", "C": "step limit"}


def load(settings: list[str], epochs: int) -> Params:
    """params.yaml with `KEY=VALUE` settings (YAML values) applied, shrunk to `epochs`."""
    overrides = {}
    for setting in settings:
        key, _, value = setting.partition("=")
        overrides[key] = YAML(typ="safe", pure=True).load(value)
    raw = with_overrides(read_yaml(ROOT / "params.yaml"), {**overrides, "train.epochs": epochs})
    return parse_params(raw, source="params.yaml with --set")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load_images(archive: str | None, images: int, params: Params
                ) -> tuple[cifar.Split, cifar.Split]:
    """(train, val): --images training images and a quarter as many validation images."""
    if archive:
        train, test = cifar.read_archive(archive)
        splits = preprocess.split(train, test, params.data.val_size, train_limit=images)
        val = splits["val"]
        n_val = max(1, len(splits["train"]) // 4)
        return splits["train"], cifar.Split(val.images[:n_val], val.labels[:n_val])
    rng = np.random.default_rng(params.seed)

    def generated(n: int) -> cifar.Split:
        return cifar.Split(rng.integers(0, 256, (n, *cifar.IMAGE_SHAPE), dtype=np.uint8),
                           rng.integers(0, len(cifar.CLASSES), n, dtype=np.uint8))

    return generated(images), generated(max(1, images // 4))


def timer_callback():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Wall time of every epoch (training + validation) and of its training phase."""

        def __init__(self):
            super().__init__()
            self.epochs: list[dict] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.train_end = time.perf_counter(), None

        def on_test_begin(self, logs=None):
            self.train_end = self.train_end or time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            end = time.perf_counter()
            self.epochs.append({"seconds": end - self.start,
                                "train_seconds": (self.train_end or end) - self.start})

    return EpochTimer()


def seed_fit(params: Params, train: cifar.Split, val: cifar.Split, callback):
    """The seed's script: same model, plain SGD(0.01), `fit` on numpy arrays, A's precision."""
    import keras

    import devices
    from model import NUM_CLASSES, build_model

    devices.configure(params.train, params.seed)  # seeds, the dtype policy
    model = build_model(params.model, params.seed)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    onehot = keras.utils.to_categorical
    model.fit(train.images, onehot(train.labels, NUM_CLASSES),
              batch_size=params.train.batch_size, epochs=params.train.epochs,
              validation_data=(val.images, onehot(val.labels, NUM_CLASSES)),
              callbacks=[callback], verbose=0)
    return model


def step_limit_fit(params: Params, train: cifar.Split, callback):
    """The pipeline's model and compilation fitted on one batch, repeated: no input pipeline."""
    import keras

    import dataset
    import devices
    import fitting as stage
    from model import NUM_CLASSES, build_model

    setup = devices.configure(params.train, params.seed)
    batch, steps = params.train.batch_size, dataset.steps_per_epoch(len(train),
                                                                     params.train.batch_size)
    images = train.images[:batch]
    labels = keras.utils.to_categorical(train.labels[:batch], NUM_CLASSES).astype("float32")
    with setup.scope():
        model = build_model(params.model, params.seed)
        stage.compile_model(model, params, steps, setup.xla)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        data = tf.data.Dataset.from_tensors((images, labels)).repeat()
    else:
        class Repeated(keras.utils.PyDataset):
            def __len__(self):
                return steps * params.train.epochs

            def __getitem__(self, index):
                return images, labels

        data = Repeated()
    model.fit(data, epochs=params.train.epochs, steps_per_epoch=steps, callbacks=[callback],
              verbose=0)
    return model


def gpu_peak_mib() -> float | None:
    import keras

    if keras.backend.backend() == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        return gpus[0].memory_stats()["peak_bytes_in_use"] / 2**20 if gpus else None
    import tensorflow as tf

    if not tf.config.list_logical_devices("GPU"):
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


def child(kind: str, data: str, epochs: int, result_path: str, settings: list[str]) -> None:
    """One training run (A or B); writes its epoch times and peak memory as JSON."""
    params = load(settings, epochs)
    os.environ["KERAS_BACKEND"] = params.train.backend  # before anything imports Keras
    import keras

    if kind == "A":
        import fitting as stage  # before the first memory reading, as B's imports are

    with np.load(data, allow_pickle=False) as arrays:
        train = cifar.Split(arrays["train_images"], arrays["train_labels"])
        val = cifar.Split(arrays["val_images"], arrays["val_labels"])
    timer = timer_callback()
    result = {"kind": kind, "peak_rss_mib_before_fit": peak_rss_mib()}
    if kind == "A":
        fitted = stage.fit(params, train, val, callbacks=[timer], verbose=0)
        model, history = fitted.model, fitted.history
    elif kind == "B":
        model, history = seed_fit(params, train, val, timer), []
    else:
        model, history = step_limit_fit(params, train, timer), []
    result |= {"epochs": timer.epochs, "peak_rss_mib": peak_rss_mib(),
               "backend": keras.backend.backend(),
               "policy": keras.mixed_precision.global_policy().name}
    if (gpu_peak := gpu_peak_mib()) is not None:
        result["gpu_peak_mib"] = gpu_peak
    if kind == "A":  # what the stage adds per epoch besides MLflow
        from checkpoint import Checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            saver = Checkpoint(tmp, "bench")
            times = []
            for _ in range(3):
                start = time.perf_counter()
                saver.save(model, len(history), "bench", history)
                times.append(time.perf_counter() - start)
        result["checkpoint_save_s"] = statistics.median(times)
    Path(result_path).write_text(json.dumps(result))


def run_child(kind: str, data: Path, epochs: int, workdir: Path, round_: int,
              settings: list[str]) -> dict:
    result_path = workdir / f"{kind}{round_}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--data", str(data),
               "--epochs", str(epochs), "--child-result", str(result_path),
               *(f"--set={setting}" for setting in settings)]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench_train: run {kind} of round {round_} failed:\n{done.stderr[-4000:]}")
    return json.loads(result_path.read_text())


def steady(epochs: list[dict]) -> list[dict]:
    return epochs[1:] or epochs


def spread(values: list[float]) -> dict:
    median = statistics.median(values)
    return {"median": median, "min": min(values), "max": max(values),
            "spread_pct": 100 * (max(values) - min(values)) / median, "per_round": values}


def summarize(runs: list[dict], images: int) -> dict:
    rate = {key: [images * len(steady(r["epochs"])) / sum(e[key] for e in steady(r["epochs"]))
                  for r in runs] for key in ("seconds", "train_seconds")}
    summary = {
        "images_per_second": spread(rate["seconds"]),
        "train_phase_images_per_second": spread(rate["train_seconds"]),
        "epoch_s": statistics.median(e["seconds"] for r in runs for e in steady(r["epochs"])),
        "first_epoch_s": statistics.median(r["epochs"][0]["seconds"] for r in runs),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "peak_rss_mib_before_fit": max(r["peak_rss_mib_before_fit"] for r in runs),
        "runs": runs}
    for key in ("gpu_peak_mib", "checkpoint_save_s"):
        if key in runs[0]:
            summary[key] = statistics.median(r[key] for r in runs)
    return summary


def environment(backend: str) -> dict:
    import importlib.metadata

    def git(*args):
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    return {"command": " ".join(sys.argv), "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "python": platform.python_version(), "backend": backend,
            "backend_version": importlib.metadata.version(backend),
            "keras": importlib.metadata.version("keras"), "cpus": os.cpu_count(),
            "gpus": gpu_names()}


def gpu_names() -> list[str]:
    """The GPUs nvidia-smi lists (the parent never initialises a backend)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return done.stdout.split("\n")[:-1] if done.returncode == 0 else []


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", help="CIFAR-10 binary archive (default: random images)")
    parser.add_argument("--images", type=positive, default=4096, help="training images used")
    parser.add_argument("--epochs", type=positive, default=3, help="epochs of every run")
    parser.add_argument("--rounds", type=positive, default=2, help="A B rounds")
    parser.add_argument("--repo", help="time a no-op `dvc repro` in this repository")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml key, as `dvc exp run -S` (repeatable)")
    for hidden in ("--child", "--data", "--child-result"):  # one training run in a child process
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def report(results: dict) -> None:
    env, config = results["environment"], results["config"]
    print(f"bench_train: {env['command']}\n  commit {env['commit']} (dirty: {env['dirty']}), "
          f"python {env['python']}, {env['backend']} {env['backend_version']}, "
          f"keras {env['keras']}, "
          f"{env['cpus']} CPUs, GPUs: {', '.join(env['gpus']) or 'none'}; "
          f"precision {results['A']['runs'][0]['policy']}")
    print(f"  data: {config['data']}; {config['train_images']} train / {config['val_images']} val "
          f"images, batch {config['batch_size']} -> {config['steps_per_epoch']} steps per epoch, "
          f"{config['epochs']} epochs x {config['rounds']} rounds (A B C alternating, "
          "each run in a fresh process)")
    a = results["A"]
    print(f"training throughput: training images / epoch wall time (train + validation), "
          f"{config['measured_epochs']}; median over rounds (min..max, spread)")
    for kind in KINDS:
        side = results[kind]
        rate, phase = side["images_per_second"], side["train_phase_images_per_second"]
        print(f"  {kind} {KINDS[kind]:19} {rate['median']:8.1f} img/s ({rate['min']:.1f}.."
              f"{rate['max']:.1f}, {rate['spread_pct']:.1f}%, n={len(rate['per_round'])})  "
              f"epoch {side['epoch_s']:.2f} s, first epoch {side['first_epoch_s']:.2f} s; "
              f"train phase alone {phase['median']:.1f} img/s")
    print(f"  ratio A/C, train phase, pipeline over the step limit: "
          f"{results['ratio_a_over_c_train_phase']:.3f} (goal >= 0.9)")
    print(f"  ratio A/B, whole epochs, pipeline over plain Keras: {results['ratio_a_over_b']:.3f} "
          f"(goal >= 1.0; train phase alone: {results['ratio_a_over_b_train_phase']:.3f})")
    print("peak memory (ru_maxrss of the child; before fit = imports and data):")
    for kind in KINDS:
        side = results[kind]
        gpu = f", GPU peak {side['gpu_peak_mib']:.0f} MiB" if "gpu_peak_mib" in side else ""
        print(f"  {kind} {side['peak_rss_mib']:.0f} MiB (before fit "
              f"{side['peak_rss_mib_before_fit']:.0f} MiB){gpu}")
    pipe, mlf = results["input_pipeline"], results["mlflow"]
    print(f"input pipeline alone (every batch of dataset.TrainBatches, {pipe['images']} images, "
          f"nothing training): {pipe['images_per_second']:.0f} img/s = "
          f"{100 * a['train_phase_images_per_second']['median'] / pipe['images_per_second']:.1f}% "
          "of an A train phase if made serially")
    epoch = a["epoch_s"]
    log, sync = mlf["log_metrics_s"], mlf["per_epoch_sync_s"]
    print(f"MLflow (sqlite, median of {mlf['calls']} calls): log_metrics of one epoch's row "
          f"{1000 * log:.1f} ms = {100 * log / epoch:.3f}% of an A epoch ({epoch:.2f} s); with "
          f"train.py's history query {1000 * sync:.1f} ms = {100 * sync / epoch:.3f}%; "
          f"store setup {mlf['store_setup_s']:.2f} s, once per stage")
    print(f"checkpoint save (train stage, every epoch, not in A's figure): "
          f"{a['checkpoint_save_s']:.3f} s = {100 * a['checkpoint_save_s'] / epoch:.2f}% of an "
          "A epoch")
    prep, repro = results["preprocess"], results["dvc_repro"]
    print("preprocess of the full archive: " + (
        f"skipped ({prep['skipped']})" if "skipped" in prep
        else f"{prep['seconds']:.2f} s (archive in the page cache) -> {prep['counts']}"))
    print("dvc repro with nothing to do: " + (
        f"skipped ({repro['skipped']})" if "skipped" in repro
        else f"{repro['seconds']:.2f} s ({results['config']['repo']})"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args.child, args.data, args.epochs, args.child_result, args.set)
        return
    params = load(args.set, args.epochs)
    train, val = load_images(args.archive, args.images, params)
    batch = params.train.batch_size
    config = {"data": f"archive {args.archive}" if args.archive else "generated random images",
              "train_images": len(train), "val_images": len(val), "batch_size": batch,
              "steps_per_epoch": -(-len(train) // batch), "epochs": args.epochs,
              "rounds": args.rounds, "repo": args.repo, "model": params.model.model_dump(),
              "augment": params.augment.model_dump(), "settings": args.set,
              "measured_epochs": f"epochs 2..{args.epochs}" if args.epochs > 1
              else "epoch 1 only (compile included)"}
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images.npz"
        np.savez(data, train_images=train.images, train_labels=train.labels,
                 val_images=val.images, val_labels=val.labels)
        for round_ in range(1, args.rounds + 1):
            for kind in KINDS:
                run = run_child(kind, data, args.epochs, Path(tmp), round_, args.set)
                runs[kind].append(run)
                times = ", ".join(f"{e['seconds']:.2f}" for e in run["epochs"])
                print(f"round {round_} {kind} ({KINDS[kind]}): epochs {times} s", flush=True)
    results = {"config": config, "environment": environment(params.train.backend),
               **{kind: summarize(runs[kind], len(train)) for kind in KINDS}}
    for key, suffix in (("images_per_second", ""),
                        ("train_phase_images_per_second", "_train_phase")):
        results[f"ratio_a_over_b{suffix}"] = (
            results["A"][key]["median"] / results["B"][key]["median"])
    results["ratio_a_over_c_train_phase"] = (
        results["A"]["train_phase_images_per_second"]["median"]
        / results["C"]["train_phase_images_per_second"]["median"])
    os.environ["KERAS_BACKEND"] = params.train.backend
    import keras  # noqa: F401  (now, with the --set backend; src/backend.py then leaves it)

    results["input_pipeline"] = side_costs.time_input_pipeline(train, params)
    results["mlflow"] = side_costs.time_mlflow()
    results["preprocess"] = (side_costs.time_preprocess(args.archive, params) if args.archive
                             else {"skipped": "no --archive"})
    results["dvc_repro"] = (side_costs.time_dvc_repro(args.repo) if args.repo
                            else {"skipped": "no --repo"})
    report(results)
    if args.json:
        atomic.write_json(args.json, results)


if __name__ == "__main__":
    cli.run("bench_train", main)
