"""Typed configs, YAML round trip, the override syntax; plus the L0 helpers (errors, utils)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flowmatch.config import (
    CouplingConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    TrackingConfig,
    TrainConfig,
    apply_overrides,
    config_diff,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from flowmatch.errors import ConfigError, FlowmatchError, NonFiniteLossError, UnknownNameError
from flowmatch.utils import as_time, lookup, make_generator, resolve_device, seed_everything

TOP_KEYS = ["name", "data", "path", "coupling", "time", "model", "train", "eval", "tracking", "reflow", "distill",
            "consistency", "lora", "apt", "shortcut", "meanflow", "ot_cfm"]
TRAIN_KEYS = ["steps", "batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip", "ema_decay",
              "ckpt_every", "log_every", "seed", "device", "loss"]


# --------------------------------------------------------------------------- from_dict: keys


def test_defaults_from_empty_and_none():
    assert from_dict({}) == ExperimentConfig()
    assert from_dict(None) == ExperimentConfig()


def test_top_level_keys_are_the_documented_sections():
    assert [f.name for f in dataclasses.fields(ExperimentConfig)] == TOP_KEYS


def test_unknown_top_level_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        from_dict({"trian": {"lr": 0.1}})
    msg = str(e.value)
    assert "trian" in msg
    for k in TOP_KEYS:
        assert k in msg


def test_unknown_nested_key_names_dotted_path_and_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        from_dict({"train": {"lrr": 0.1}})
    msg = str(e.value)
    assert "train.lrr" in msg
    for k in TRAIN_KEYS:
        assert k in msg
    # keys of other sections are not offered as valid keys of train
    assert "hidden" not in msg


def test_config_error_is_value_error_and_flowmatch_error():
    with pytest.raises(ValueError):
        from_dict({"nope": 1})
    with pytest.raises(FlowmatchError):
        from_dict({"nope": 1})


def test_top_level_must_be_mapping():
    with pytest.raises(ConfigError):
        from_dict([1, 2, 3])
    with pytest.raises(ConfigError, match="mapping"):
        from_dict({"train": 3})


# --------------------------------------------------------------------------- from_dict: types


@pytest.mark.parametrize("value", ["10", True, 10.0, None, [10]])
def test_int_field_refuses_non_int(value):
    with pytest.raises(ConfigError) as e:
        from_dict({"train": {"steps": value}})
    assert "train.steps" in str(e.value)


def test_int_accepted_for_float_and_converted():
    cfg = from_dict({"train": {"lr": 1}, "path": {"sigma": 0}})
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.path.sigma == 0.0 and type(cfg.path.sigma) is float


@pytest.mark.parametrize("value", [True, "0.1", None])
def test_float_field_refuses_bool_and_str(value):
    with pytest.raises(ConfigError, match="train.lr"):
        from_dict({"train": {"lr": value}})


def test_bool_and_str_fields_are_strict():
    with pytest.raises(ConfigError, match="eval.plots"):
        from_dict({"eval": {"plots": 1}})
    with pytest.raises(ConfigError, match="data.source"):
        from_dict({"data": {"source": 3}})
    assert from_dict({"eval": {"plots": False}}).eval.plots is False


def test_optional_field_accepts_none_and_str_only():
    assert from_dict({"tracking": {"name": None}}).tracking.name is None
    assert from_dict({"tracking": {"name": "run1"}}).tracking.name == "run1"
    with pytest.raises(ConfigError, match="tracking.name"):
        from_dict({"tracking": {"name": 5}})


def test_nested_values_are_set():
    cfg = from_dict({"name": "x", "data": {"target": "8gaussians", "dim": 2},
                     "coupling": {"name": "ot", "method": "sinkhorn"}, "model": {"hidden": 32}})
    assert cfg.name == "x"
    assert cfg.data == DataConfig(source="gaussian", target="8gaussians", dim=2)
    assert cfg.coupling == CouplingConfig(name="ot", method="sinkhorn")
    assert cfg.model.hidden == 32 and cfg.model.depth == ModelConfig().depth


def test_to_dict_is_plain_nested_dict():
    d = to_dict(ExperimentConfig())
    assert list(d) == TOP_KEYS
    assert isinstance(d["train"], dict) and d["train"]["lr"] == TrainConfig().lr
    assert from_dict(d) == ExperimentConfig()


# --------------------------------------------------------------------------- overrides


def test_override_float_in_exponent_notation():
    cfg = apply_overrides(ExperimentConfig(), ["train.lr=1e-3"])
    assert cfg.train.lr == pytest.approx(1e-3) and type(cfg.train.lr) is float


def test_overrides_several_types_and_new_object():
    base = ExperimentConfig()
    cfg = apply_overrides(base, ["train.steps=10", "model.activation=relu", "eval.plots=false",
                                 "name=smoke", "tracking.name=null", "path.sigma=0.25", "train.lr=2.5e-4"])
    assert cfg.train.steps == 10
    assert cfg.model.activation == "relu"
    assert cfg.eval.plots is False
    assert cfg.name == "smoke"
    assert cfg.tracking.name is None
    assert cfg.path.sigma == 0.25
    assert cfg.train.lr == pytest.approx(2.5e-4)
    # the input config is not mutated
    assert base == ExperimentConfig()


def test_override_value_with_equals_sign_kept():
    cfg = apply_overrides(ExperimentConfig(), ["name=a=b"])
    assert cfg.name == "a=b"


def test_override_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        apply_overrides(ExperimentConfig(), ["train.lrr=1e-3"])
    msg = str(e.value)
    assert "train.lrr" in msg
    for k in TRAIN_KEYS:
        assert k in msg


def test_override_unknown_section_lists_valid_sections():
    with pytest.raises(ConfigError) as e:
        apply_overrides(ExperimentConfig(), ["trian.lr=1e-3"])
    msg = str(e.value)
    assert "trian" in msg
    for k in ["data", "path", "coupling", "time", "model", "train", "eval", "tracking", "reflow"]:
        assert k in msg


def test_override_through_a_leaf_is_an_error():
    with pytest.raises(ConfigError):
        apply_overrides(ExperimentConfig(), ["train.lr.x=1"])


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(ExperimentConfig(), ["train.lr"])


def test_override_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="train.steps"):
        apply_overrides(ExperimentConfig(), ["train.steps=abc"])
    with pytest.raises(ConfigError, match="train.steps"):
        apply_overrides(ExperimentConfig(), ["train.steps=true"])


# --------------------------------------------------------------------------- YAML


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(ExperimentConfig(), ["train.lr=3e-4", "model.time_embedding=fourier",
                                               "tracking.name=abc", "eval.atol=1e-7", "data.target=spirals"])
    p = tmp_path / "cfg.yaml"
    save_config(cfg, str(p))
    back = load_config(str(p))
    assert back == cfg
    assert config_diff(cfg, back) == []


def test_load_config_with_overrides(tmp_path):
    p = tmp_path / "cfg.yaml"
    save_config(ExperimentConfig(), str(p))
    cfg = load_config(str(p), ["train.batch_size=7", "coupling.name=ot"])
    assert cfg.train.batch_size == 7 and cfg.coupling.name == "ot"


def test_hand_written_yaml_with_exponent_floats(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("name: hand\ntrain:\n  lr: 1e-4\n  steps: 20\neval:\n  atol: 1E-6\n")
    cfg = load_config(str(p))
    assert cfg.name == "hand"
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.steps == 20
    assert cfg.eval.atol == pytest.approx(1e-6)
    # untouched sections keep their defaults
    assert cfg.model == ModelConfig()


def test_empty_yaml_gives_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_config(str(p)) == ExperimentConfig()


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(unknown))
    assert "unknown.yaml" in str(e.value) and "train.lrr" in str(e.value)


# --------------------------------------------------------------------------- config_diff


def test_config_diff_lists_dotted_keys_sorted():
    a = ExperimentConfig()
    b = apply_overrides(a, ["train.lr=0.5", "model.hidden=12", "name=other"])
    assert config_diff(a, b) == ["model.hidden", "name", "train.lr"]
    assert config_diff(b, a) == ["model.hidden", "name", "train.lr"]
    assert config_diff(a, ExperimentConfig()) == []


def test_config_diff_on_dicts_with_missing_keys():
    assert config_diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1}, "d": 3}) == ["a.c", "d"]


# --------------------------------------------------------------------------- errors and utils (L0)


def test_unknown_name_error_message_not_quoted():
    e = UnknownNameError("unknown solver 'x'")
    assert str(e) == "unknown solver 'x'"
    assert isinstance(e, KeyError) and isinstance(e, FlowmatchError)


def test_non_finite_loss_error_message():
    e = NonFiniteLossError(12, float("nan"), checkpoint="run/ckpt.pt")
    assert e.step == 12 and "12" in str(e) and "run/ckpt.pt" in str(e)
    assert isinstance(e, FloatingPointError)
    assert "no checkpoint" in str(NonFiniteLossError(3, float("inf")))


def test_lookup_lists_sorted_valid_names():
    reg = {"zeta": 1, "alpha": 2, "mid": 3}
    assert lookup(reg, "mid", "thing") == 3
    with pytest.raises(UnknownNameError) as e:
        lookup(reg, "nope", "thing")
    assert "alpha, mid, zeta" in str(e.value) and "'nope'" in str(e.value)
    with pytest.raises(UnknownNameError):
        lookup(reg, ["unhashable"], "thing")


def test_as_time_broadcast_and_shape_check():
    x = torch.zeros(5, 3, dtype=torch.float64)
    t = as_time(0.25, x)
    assert t.shape == (5,) and t.dtype == torch.float64 and torch.all(t == 0.25)
    tb = torch.linspace(0, 1, 5)
    assert torch.equal(as_time(tb, x), tb.double())
    with pytest.raises(ValueError):
        as_time(torch.zeros(4), x)
    with pytest.raises(ValueError):
        as_time(torch.zeros(5, 1), x)


def test_make_generator_and_seed_everything_are_deterministic():
    a = torch.randn(4, generator=make_generator(3))
    b = torch.randn(4, generator=make_generator(3))
    c = torch.randn(4, generator=make_generator(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    seed_everything(11)
    u = torch.rand(3)
    seed_everything(11)
    assert torch.equal(u, torch.rand(3))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    if not torch.cuda.is_available():
        with pytest.raises(UnknownNameError):
            resolve_device("cuda")


def test_eval_and_tracking_defaults_documented():
    assert EvalConfig().solver == "dopri5"
    assert TrackingConfig().mode == "offline"
