"""params.yaml loading: the real file is valid; every malformed one is a line naming the key."""

from __future__ import annotations

import copy
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dataset
from conftest import ROOT
from params import ParamsError, load_params, parse_params, read_yaml, with_overrides

REAL = read_yaml(ROOT / "params.yaml")


def test_real_params_reproduce_the_seed():
    params = load_params(ROOT / "params.yaml")
    assert params.model.filters == [64, 128, 256, 512]
    assert params.model.dense_units == [128, 256, 512, 1024]
    train = params.train
    assert (train.learning_rate, train.epochs, train.batch_size) == (0.01, 50, 32)
    assert params.data.val_size == 10000 and params.data.train_limit is None
    assert (params.model.l2, params.train.momentum, params.train.label_smoothing) == (0, 0, 0)
    assert params.augment == dataset.NO_AUGMENTATION and params.train.backend == "tensorflow"
    assert (params.train.weight_decay, params.train.nesterov) == (0, False)
    assert params.train.lr_schedule == "constant" and params.train.early_stopping_patience == 0


def with_change(path: tuple[str, ...], value) -> dict:
    raw = copy.deepcopy(REAL)
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return raw


@pytest.mark.parametrize(("path", "value", "message"), [
    (("train", "epochs"), 0, "train.epochs: Input should be greater than 0"),
    (("train", "epochs"), "50", "train.epochs: Input should be a valid integer.*got '50'"),
    (("train", "epochs"), "ten", r"train.epochs: Input should be a valid integer.*\(got 'ten'\)$"),
    (("train", "epochz"), 5, "train.epochz: unknown key"),
    (("model", "dropout"), 1.5, r"model.dropout: Input should be less than 1 \(got 1.5\)$"),
    (("train", "lr_schedule"), "linear", "train.lr_schedule: Input should be 'constant' or"),
    (("data", "md5"), "xyz", "data.md5: String should match pattern"),
    (("tune", "study_name"), "mine-confirm", "tune.study_name: 'mine-confirm' ends in '-confirm', "
     "which names the companion study that confirms a study's best trials$"),
])
def test_bad_values_name_the_key(path, value, message):
    with pytest.raises(ParamsError, match="^params.yaml: " + message):  # message: a regex
        parse_params(with_change(path, value))


def test_the_tune_section_is_checked_by_the_same_schema(tmp_path):
    """load_params refuses a bad `tune` key as it refuses any other, naming the key."""
    path = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text()
    path.write_text(text.replace("\ntune:", "\ntune:\n  n_trial: 20  # a typo of n_trials", 1))
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert str(error.value) == f"{path}: tune.n_trial: unknown key"

    assert load_params(ROOT / "params.yaml").tune.space["model.dropout"].high == 0.5
    too_high = with_change(("tune", "space", "model.dropout"), {"low": 0.0, "high": 1.5})
    with pytest.raises(ParamsError, match=r"^params.yaml: tune.space.model.dropout: value 1.5 is "
                                          r"refused \(model.dropout: Input should be less than 1"):
        parse_params(too_high)


def test_missing_section_is_named():
    raw = copy.deepcopy(REAL)
    del raw["train"]
    with pytest.raises(ParamsError, match=r"^params.yaml: train: missing key$"):
        parse_params(raw)


def test_yaml_syntax_error_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert "YAML syntax error" in str(error.value) and "\n" not in str(error.value)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                     st.floats(allow_nan=True), st.text(max_size=8))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)
_keys = st.sampled_from([(section, key) for section, body in REAL.items()
                         if isinstance(body, dict) for key in body] + [("seed",)])


@settings(max_examples=300, deadline=None)
@given(key=_keys, value=_values)
def test_any_value_is_accepted_or_refused_in_one_line(key, value):
    """Whatever a key holds, loading either succeeds or raises ParamsError of one line."""
    try:
        parse_params(with_change(key, value))
    except ParamsError as error:
        text = str(error)
        assert "\n" not in text and text.startswith("params.yaml: ")


@settings(max_examples=100, deadline=None)
@given(document=_values)
def test_any_document_is_refused_in_one_line(document):
    with pytest.raises(ParamsError) as error:
        parse_params(document)
    assert "\n" not in str(error.value)


def comment_owners(text: str) -> list[tuple[str, str]]:
    """(dotted key, comment) for every comment of a block-style YAML file: an end-of-line comment
    belongs to the key on its line, a comment line to the next key below it, or to the list key
    whose items follow it."""
    owners, pending, stack = [], [], []  # stack: (indentation, key) of the enclosing keys
    for line in text.splitlines():
        body, *comment = re.split(r"(?:^|(?<=\s))#", line, maxsplit=1)
        comment = comment[0].strip() if comment else None
        indent = len(body) - len(body.lstrip())
        key = re.match(r"\s*([^\s:#-][^:]*):(\s|$)", body)
        if key:
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, key.group(1)))
            path = ".".join(k for _, k in stack)
            owners += [(path, c) for c in pending] + ([(path, comment)] if comment else [])
            pending = []
        elif body.strip().startswith("-"):
            owners += [(".".join(k for _, k in stack), c) for c in pending]
            pending = []
        elif comment:
            pending.append(comment)
    return sorted(owners + [("", c) for c in pending])


OVERRIDES = {"seed": 7, "data.train_limit": 100, "model.dropout": 0.25, "model.filters": [8, 16],
             "train.epochs": 3, "evaluate.batch_size": 64, "mlflow.experiment": "other",
             "tune.n_trials": 5}


def test_dvc_set_param_keeps_every_comment_beside_its_key(tmp_path):
    """`dvc exp run -S` rewrites params.yaml with `apply_overrides`: only values change."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    original = (ROOT / "params.yaml").read_text()
    path.write_text(original)
    apply_overrides(path, [f"{key}={json.dumps(value)}" for key, value in OVERRIDES.items()])
    rewritten = path.read_text()
    assert comment_owners(rewritten) == comment_owners(original)
    assert read_yaml(path) == with_overrides(REAL, OVERRIDES)
    assert load_params(path).model.filters == [8, 16]

    # the layout is what DVC writes: setting a key to its own value changes no byte
    path.write_text(original)
    apply_overrides(path, ["seed=42"])
    assert path.read_text() == original


def test_comment_owners_follow_keys_and_lists():
    text = "# head\na:  # on a\n  # above b\n  b:\n  # in the list\n  - 1\n  c: 2  # on c\n"
    assert comment_owners(text) == sorted([("a", "head"), ("a", "on a"), ("a.b", "above b"),
                                           ("a.b", "in the list"), ("a.c", "on c")])
