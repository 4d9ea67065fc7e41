"""scripts/gpu_study.sh's control flow, run by bash with stand-ins for the stage scripts and the
GPU machine's data: what a person reads when something goes wrong."""

from __future__ import annotations

import re
import shutil

from conftest import ROOT, sh

TUNE = """import sys
from pathlib import Path

if "--report-only" in sys.argv:
    Path("reported").touch()
    sys.exit(0)
try:
    Path("one-worker-fails").touch(exist_ok=False)  # the first worker to start
except FileExistsError:
    print("tune: trial 0 finished")
    sys.exit(0)
sys.exit("tune: error: the study storage is gone")
"""


def test_a_failed_worker_ends_the_study_naming_its_log(tmp_path):
    repo, out = tmp_path / "repo", tmp_path / "out"
    (repo / "src").mkdir(parents=True)
    (repo / "benchmarks").mkdir()
    (repo / ".gpu/tools").mkdir(parents=True)
    shutil.copytree(ROOT / "scripts", repo / "scripts")
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("params.py", "atomic.py", "cli.py"):  # gpu_setup.sh sets params with them
        shutil.copy(ROOT / "src" / name, repo / "src" / name)
    for name in ("fetch.py", "preprocess.py"):
        (repo / "src" / name).write_text("")
    (repo / "src/tune.py").write_text(TUNE)
    (repo / ".gpu/tools/cifar10_jpg_to_binary.py").write_text(f"print('md5 {'0' * 32}')\n")
    (tmp_path / "tmp").mkdir()
    out.mkdir()  # $OUT, as the machine that runs it provides

    result = sh("bash", "scripts/gpu_study.sh", cwd=repo, check=False, OUT=str(out),
                WORKERS="2", EPOCHS="1", TMPDIR=str(tmp_path / "tmp"))

    assert result.returncode == 1, result.stdout + result.stderr
    named = re.findall(r"^gpu_study: a tuning worker failed; the end of its log, (\S+):$",
                       result.stderr, re.MULTILINE)
    assert len(named) == 1, result.stderr
    assert "tune: error: the study storage is gone" in result.stderr
    assert "tune: error: the study storage is gone" in (out / named[0].split("/")[-1]).read_text()
    other = ({"study-1.log", "study-2.log"} - {named[0].split("/")[-1]}).pop()
    assert (out / other).read_text() == "tune: trial 0 finished\n"  # it was waited for
    assert not list((tmp_path / "tmp").rglob("reported"))  # no report of a broken study
