"""params.yaml loading: the real file is valid; every malformed one is a line naming the key."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dataset
from conftest import ROOT
from params import ParamsError, load_params, parse_params, read_yaml

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
    (("train", "epochs"), "50", "train.epochs: Input should be a valid integer"),
    (("train", "epochz"), 5, "train.epochz: unknown key"),
    (("model", "dropout"), 1.5, "model.dropout: Input should be less than 1"),
    (("train", "lr_schedule"), "linear", "train.lr_schedule: Input should be 'constant' or"),
    (("data", "md5"), "xyz", "data.md5: String should match pattern"),
])
def test_bad_values_name_the_key(path, value, message):
    with pytest.raises(ParamsError, match="^params.yaml: " + message.replace("(", r"\(")):
        parse_params(with_change(path, value))


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
