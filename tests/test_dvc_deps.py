"""dvc.yaml against the code: each stage's src/ deps are derived from its script's imports, and
its plots have named axes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT
from params import read_yaml

DVC_YAML = read_yaml(ROOT / "dvc.yaml")
STAGES = DVC_YAML["stages"]


def local_imports(script: Path) -> set[str]:
    """`script` and every module of its folder it imports, directly or through another one."""
    folder, seen, todo = script.parent, set(), [script]
    while todo:
        path = todo.pop()
        if path.name in seen:
            continue
        seen.add(path.name)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            todo += [folder / f"{name.split('.')[0]}.py" for name in names
                     if (folder / f"{name.split('.')[0]}.py").is_file()]
    return seen


def test_local_imports_are_followed_transitively(tmp_path):
    (tmp_path / "stage.py").write_text("import os\nimport a\n")
    (tmp_path / "a.py").write_text("from b import thing\n")
    (tmp_path / "b.py").write_text("def f():\n    import c.sub\n")
    (tmp_path / "c.py").write_text("")
    (tmp_path / "unused.py").write_text("")
    assert local_imports(tmp_path / "stage.py") == {"stage.py", "a.py", "b.py", "c.py"}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_are_exactly_the_modules_its_script_imports(name):
    stage = STAGES[name]
    script = stage["cmd"].split()[-1]
    assert stage["cmd"] == f"python {script}" and script.startswith("src/")
    listed = {dep for dep in stage["deps"] if dep.startswith("src/") and dep.endswith(".py")}
    derived = {f"src/{module}" for module in local_imports(ROOT / script)}
    assert {"missing": sorted(derived - listed), "superfluous": sorted(listed - derived)} == \
        {"missing": [], "superfluous": []}


STAGE_SCRIPTS = ("fetch", "preprocess", "train", "evaluate", "tune")


@pytest.mark.parametrize("name", STAGE_SCRIPTS)
def test_a_stage_imports_libraries_never_another_stage(name):
    """A stage shares code through library modules: importing another stage's script would make
    it depend on that stage's code (an edit of preprocess's summary would retrain the model)."""
    imported = local_imports(ROOT / "src" / f"{name}.py") - {f"{name}.py"}
    assert sorted(imported & {f"{other}.py" for other in STAGE_SCRIPTS}) == []


def test_the_import_check_sees_a_stage_imported_through_a_library(tmp_path):
    (tmp_path / "train.py").write_text("import fitting\n")
    (tmp_path / "fitting.py").write_text("from preprocess import load_split\n")
    (tmp_path / "preprocess.py").write_text("")
    assert "preprocess.py" in local_imports(tmp_path / "train.py")


def all_plots() -> dict[str, dict]:
    plots = {}
    for entry in DVC_YAML.get("plots", []):
        plots.update(entry)
    for stage in STAGES.values():
        for entry in stage.get("plots", []):
            plots.update(entry if isinstance(entry, dict) else {entry: {}})
    return plots


@pytest.mark.parametrize("name", sorted(all_plots()))
def test_every_plot_has_named_axes(name):
    plot = all_plots()[name]
    assert {"x", "y", "x_label", "y_label", "title"} <= plot.keys()


def test_only_the_evaluation_metrics_are_metrics():
    """`dvc exp show` starts with the first metrics file's columns: the test figures."""
    metrics = [entry if isinstance(entry, str) else next(iter(entry))
               for stage in STAGES.values() for entry in stage.get("metrics", [])]
    assert metrics == ["${paths.metrics}"]


def test_every_stage_can_use_the_run_cache():
    """DVC neither saves nor restores a run of a stage with a `persist` output, or with a
    `cache: false` output that is not a metric or plot (dvc/stage/__init__.py, Stage.run)."""
    for stage in STAGES.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                options = {} if isinstance(entry, str) else next(iter(entry.values())) or {}
                assert not options.get("persist", False)
                assert kind != "outs" or options.get("cache", True)
