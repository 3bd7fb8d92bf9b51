"""Bad input at the boundaries: every metric on non-finite input (NaN and a warning, never a score),
one-line CLI errors where a traceback used to be, and the range of every numeric and path input
(config sections, solver and grid constructors, the bench)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import yaml

from flowmatch.bench import ToyScorer, bench_suite
from flowmatch.cli import main
from flowmatch.config import to_dict
from flowmatch.data.toy import Gaussian, get_dataset
from flowmatch.metrics import (ImageFeatureMetrics, NonFiniteInputWarning, frechet_distance,
                               gaussian_frechet, gaussian_w2, kernel_distance, log_likelihood, mmd, straightness, w2)
from flowmatch.metrics.distances import MMDReference
from flowmatch.models.classifier import FeatureClassifier

BAD = [float("nan"), float("inf"), float("-inf")]


def cloud(n: int = 64, d: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def spoiled(x: torch.Tensor, value: float, rows=(3,)) -> torch.Tensor:
    x = x.clone()
    for r in rows:
        x[r, -1] = value
    return x


def nan_with_warning(fn, match: str):
    with pytest.warns(NonFiniteInputWarning, match=match):
        out = fn()
    return out


# ------------------------------------------------------------------------------- metrics on NaN / inf


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("method", ["pot", "scipy"])
def test_w2_of_a_non_finite_cloud_is_nan_not_a_perfect_score(value, method):
    if method == "pot":
        pytest.importorskip("ot")
    x, y = cloud(seed=0), cloud(seed=1)
    out = nan_with_warning(lambda: w2(spoiled(x, value, rows=(3, 9)), y, method=method), r"w2: .*2 of 64 rows of x")
    assert math.isnan(out)
    assert math.isnan(nan_with_warning(lambda: w2(x, spoiled(y, value), method=method), r"1 of 64 rows of y"))
    assert w2(x, y, method=method) > 0.1  # finite clouds: a score, no warning


@pytest.mark.parametrize("value", BAD)
def test_mmd_and_its_reference_form_are_nan_on_non_finite_input(value):
    x, y = cloud(seed=0), cloud(seed=1)
    assert math.isnan(nan_with_warning(lambda: mmd(spoiled(x, value), y), r"mmd: .*1 of 64 rows of x"))
    assert math.isnan(nan_with_warning(lambda: mmd(x, spoiled(y, value)), r"mmd: .*1 of 64 rows of y"))
    ref = MMDReference(y)
    assert math.isnan(nan_with_warning(lambda: ref(spoiled(x, value)), r"mmd: .*1 of 64 rows of x"))
    assert ref(x) == pytest.approx(mmd(x, y), rel=1e-12)
    bad_ref = nan_with_warning(lambda: MMDReference(spoiled(y, value)), r"mmd: .*1 of 64 rows of y")
    assert math.isnan(bad_ref(x))


def test_toy_scorer_scores_a_diverged_sample_nan():
    scorer = ToyScorer(get_dataset("8gaussians"), 64, seed=0)
    with pytest.warns(NonFiniteInputWarning):
        scores = scorer(spoiled(cloud(), float("nan")))
    assert set(scores) == {"w2", "mmd"} and all(math.isnan(v) for v in scores.values())


@pytest.mark.parametrize("value", BAD)
def test_gaussian_closed_forms_are_nan_on_non_finite_parameters(value):
    m = torch.zeros(3)
    assert math.isnan(nan_with_warning(lambda: gaussian_w2(torch.tensor([0.0, value, 0.0]), 1.0, m, 1.0),
                                       r"gaussian_w2: .*1 of 3 values of mean1"))
    assert math.isnan(nan_with_warning(lambda: gaussian_w2(m, value, m, 1.0), r"1 of 1 values of std1"))
    cov = torch.eye(3)
    assert math.isnan(nan_with_warning(lambda: gaussian_frechet(m, spoiled(cov, value, rows=(0,)), m, cov),
                                       r"gaussian_frechet: .*1 of 3 rows of cov1"))
    assert gaussian_frechet(m, cov, m + 1, cov) == pytest.approx(3.0)


@pytest.mark.parametrize("value", BAD)
def test_frechet_distance_and_kid_are_nan_on_non_finite_features(value):
    f1, f2 = cloud(40, 5, seed=0), cloud(40, 5, seed=1)
    assert math.isnan(nan_with_warning(lambda: frechet_distance(spoiled(f1, value), f2),
                                       r"frechet_distance: .*1 of 40 rows of f1"))
    kid = nan_with_warning(lambda: kernel_distance(f1, spoiled(f2, value), num_subsets=3, subset_size=10),
                           r"kernel_distance: .*1 of 40 rows of f2")
    assert all(math.isnan(k) for k in kid)
    assert math.isfinite(frechet_distance(f1, f2)) and all(math.isfinite(k) for k in kernel_distance(f1, f2))


def test_image_feature_metrics_are_nan_on_non_finite_images():
    torch.manual_seed(0)
    clf = FeatureClassifier(1, 8, 10, width=4, feature_dim=8)
    g = torch.Generator().manual_seed(0)
    ref, x = torch.rand(32, 1, 8, 8, generator=g) * 2 - 1, torch.rand(32, 1, 8, 8, generator=g) * 2 - 1
    metrics = ImageFeatureMetrics("digits", ref, classifier=clf)
    bad = x.clone()
    bad[5, 0, 2, 2] = float("nan")
    assert math.isnan(nan_with_warning(lambda: metrics.fd(bad), r"fd: .*1 of 32 rows of x"))
    assert all(math.isnan(k) for k in nan_with_warning(lambda: metrics.kid(bad), r"kid: .*1 of 32 rows of x"))
    assert all(math.isnan(v) for v in nan_with_warning(lambda: metrics(bad), r"1 of 32 rows of x").values())
    good = metrics(x)
    assert good["fd"] == metrics.fd(x) and math.isfinite(good["kid"])
    bad_ref = nan_with_warning(lambda: ImageFeatureMetrics("digits", bad, classifier=clf), r"1 of 32 rows of reference")
    assert math.isnan(bad_ref.fd(x))


@pytest.mark.parametrize("value", BAD)
def test_straightness_of_non_finite_start_points_is_nan(value):
    res = nan_with_warning(lambda: straightness(lambda x, t: -x, spoiled(cloud(), value), num_steps=4),
                           r"straightness: .*1 of 64 rows of x0")
    assert math.isnan(res.straightness) and math.isnan(res.straightness_rel) and res.nfe == 0
    assert len(res.per_t) == 5 and all(math.isnan(p) for p in res.per_t)


@pytest.mark.parametrize("value", BAD)
def test_likelihood_of_a_non_finite_point_is_nan_and_the_others_are_kept(value):
    x1 = cloud(6, 2, seed=2).double()
    src = Gaussian(2)
    v = lambda x, t: 0.5 * x  # noqa: E731
    ok = log_likelihood(v, x1, src, solver="rk4", num_steps=8)
    res = nan_with_warning(lambda: log_likelihood(v, spoiled(x1, value, rows=(2,)), src, solver="rk4", num_steps=8),
                           r"log_likelihood: .*1 of 6 rows of x1")
    keep = [0, 1, 3, 4, 5]
    assert torch.isnan(res.logp[2]) and torch.isnan(res.x0[2]).all()
    torch.testing.assert_close(res.logp[keep], ok.logp[keep], rtol=1e-12, atol=1e-12)
    assert math.isnan(res.mean) and math.isnan(res.bits_per_dim)


def test_bench_row_of_a_diverging_field_is_nan_and_the_other_rows_unchanged():
    src, tgt = Gaussian(2), get_dataset("8gaussians")

    def blows_up_late(x, t):  # infinite velocity from t = 0.5 on: one Euler step never sees it, two do
        return torch.where(t[:, None] < 0.5, -x, x * float("inf"))

    kw = dict(solvers=["euler"], nfes=[1, 2], n=64, straightness_n=16, progress=False)
    with pytest.warns(NonFiniteInputWarning, match=r"(w2|mmd): .*64 of 64 rows of x"):
        rows = bench_suite({"m": blows_up_late}, src, tgt, **kw).rows
    one, two = rows
    assert two["nfe"] == 2 and math.isnan(two["w2"]) and math.isnan(two["mmd"]) and not two["pareto"]
    assert one["nfe"] == 1 and math.isfinite(one["w2"]) and one["pareto"]
    (alone,) = bench_suite({"m": blows_up_late}, src, tgt, **{**kw, "nfes": [1]}).rows
    assert (alone["w2"], alone["mmd"], alone["w2_floor"]) == (one["w2"], one["mmd"], one["w2_floor"])


# ------------------------------------------------------------------------------- one-line CLI errors


def one_line_error(rc: int, capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowmatch: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_cfg):
    """A tiny run trained through the CLI, and a regular file to put output paths under."""
    base = tmp_path_factory.mktemp("inputs")
    cfg = str(base / "tiny.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump(to_dict(make_cfg()), f, sort_keys=False)
    assert main(["train", cfg, "--out", str(base / "run"), "--no-progress"]) == 0
    (base / "afile").write_text("not a directory")
    return {"base": base, "cfg": cfg, "ckpt": str(base / "run" / "checkpoints" / "last.pt"),
            "file": str(base / "afile")}


def test_train_out_under_a_regular_file(run, capsys):
    out = os.path.join(run["file"], "run")
    one_line_error(main(["train", run["cfg"], "--out", out, "--no-progress"]), capsys, out, "is a file, not a directory")
    one_line_error(main(["train", run["cfg"], "--out", run["file"], "--no-progress"]), capsys, "is a file")
    one_line_error(main(["train", run["cfg"], "--out", "", "--no-progress"]), capsys, "out = ''", "non-empty path")
    assert open(run["file"]).read() == "not a directory"


def test_sample_out_under_a_regular_file_fails_before_sampling(run, capsys):
    out = os.path.join(run["file"], "samples.pt")
    one_line_error(main(["sample", run["ckpt"], "--nfe", "4", "--out", out, "--no-progress"]), capsys, out,
                   "is a file, not a directory")
    one_line_error(main(["sample", run["ckpt"], "--nfe", "4", "--out", str(run["base"]), "--no-progress"]), capsys,
                   "must be a file path, not a directory")


def test_reflow_out_under_a_regular_file(run, capsys):
    store = os.path.join(run["file"], "store")
    one_line_error(main(["reflow", "generate", "--teacher", run["ckpt"], "--n", "8", "--shard-size", "4", "--solver",
                         "euler", "--nfe", "2", "--out", store, "--no-progress"]), capsys, store, "Not a directory")
    one_line_error(main(["reflow", "run", run["cfg"], "--out", os.path.join(run["file"], "chain"), "--no-progress"]),
                   capsys, "is a file, not a directory")
    assert open(run["file"]).read() == "not a directory"


@pytest.mark.parametrize("args, needle", [
    (["--nfe", "0"], "nfes[0] = 0: must be an integer >= 1"),
    (["--nfe", "4,-2"], "nfes[1] = -2: must be an integer >= 1"),
    (["--solvers", "midpoint", "--nfe", "1"], "no row to run"),
    (["--n", "0"], "n = 0: must be an integer >= 1"),
    (["--grid-n", "0"], "grid_n = 0: must be an integer >= 1"),
    (["--likelihood-n", "-1"], "likelihood_n = -1: must be an integer >= 0"),
    (["--solvers", "dopri5", "--rtol", "0"], "rtol = 0.0: must be a finite number > 0"),
    (["--grids", "power:-1"], "rho = -1.0: must be a finite number > 0"),
])
def test_bench_bad_numbers_are_one_line_errors(run, tmp_path, capsys, args, needle):
    out = str(tmp_path / "bench")
    one_line_error(main(["bench", run["ckpt"], "--solvers", "euler", "--n", "16", *args, "--out", out,
                         "--tracking", "disabled", "--no-progress"]), capsys, needle)
    assert not os.path.exists(out)


def test_demo_checks_n_and_out_before_training(run, tmp_path, capsys):
    one_line_error(main(["demo", "--configs", run["cfg"], "--n", "0", "--out", str(tmp_path / "demo"),
                         "--no-progress"]), capsys, "n = 0: must be an integer >= 1")
    one_line_error(main(["demo", "--configs", run["cfg"], "--out", os.path.join(run["file"], "demo"),
                         "--no-progress"]), capsys, "is a file, not a directory")
    assert not os.path.exists(tmp_path / "demo")


def test_pareto_plot_of_no_rows(tmp_path):
    from flowmatch.viz import plot_pareto

    path = plot_pareto([], str(tmp_path / "empty.png"))
    assert os.path.getsize(path) > 0


def test_dopri5_on_a_blowing_up_field_is_a_one_line_error(run, tmp_path, capsys):
    ck = torch.load(run["ckpt"], map_location="cpu", weights_only=True)
    for sd in (ck["model"], ck["ema"]["model"]):
        last = [k for k in sd if k.endswith("weight")][-1]
        sd[last] = sd[last] * 1e30  # velocities near 1e30: the solution overflows at once
    blown = str(tmp_path / "blown.pt")
    torch.save(ck, blown)
    line = one_line_error(main(["sample", blown, "--solver", "dopri5", "--n", "16", "--out", str(tmp_path / "s.pt"),
                                "--no-progress"]), capsys, "dopri5", "underflowed at t = ", "fixed-step solver",
                          "looser tolerances", "check the model")
    assert "evaluations" in line and not os.path.exists(tmp_path / "s.pt")


def test_adaptive_solver_underflow_is_a_solver_error_naming_the_time():
    from flowmatch.solvers import SolverError, solve

    def finite_time_blow_up(x, t):  # dx/dt = x^2 from x0 = 2: x = 2 / (1 - 2t), infinite at t = 0.5
        return x * x

    with pytest.raises(SolverError, match=r"dopri5 .* underflowed at t = 0\.5"):
        solve(finite_time_blow_up, torch.full((4, 1), 2.0, dtype=torch.float64), "dopri5")


# ------------------------------------------------------------------------------- range checks


CONFIG_ROWS = [  # (override, key, range): one row per key
    ("data.dim=0", "data.dim", "an integer >= 1"),
    ("data.image_size=0", "data.image_size", "an integer >= 1 or null"),
    ("data.channels=-1", "data.channels", "an integer >= 1 or null"),
    ("path.sigma=-0.1", "path.sigma", "a finite number >= 0"),
    ("coupling.reg=0", "coupling.reg", "a finite number > 0"),
    ("coupling.num_iters=0", "coupling.num_iters", "an integer >= 1"),
    ("coupling.mix=1.5", "coupling.mix", "a number in [0, 1]"),
    ("time.loc=.nan", "time.loc", "a finite number"),
    ("time.scale=0", "time.scale", "a finite number > 0"),
    ("time.a=-1", "time.a", "a finite number > 0"),
    ("time.value=2", "time.value", "a number in [0, 1]"),
    ("model.hidden=0", "model.hidden", "an integer >= 1"),
    ("model.depth=0", "model.depth", "an integer >= 1"),
    ("model.time_dim=1", "model.time_dim", "an integer >= 2"),
    ("model.time_scale=0", "model.time_scale", "a finite number > 0"),
    ("model.fourier_scale=-1", "model.fourier_scale", "a finite number > 0"),
    ("model.base_channels=1", "model.base_channels", "an integer >= 2 or null"),
    ("model.channel_mult=[]", "model.channel_mult", "a non-empty list of integers >= 1"),
    ("model.num_res_blocks=0", "model.num_res_blocks", "an integer >= 1 or null"),
    ("model.attention_resolutions=[0]", "model.attention_resolutions[0]", "an integer >= 1"),
    ("model.dropout=1.0", "model.dropout", "a number in [0, 1)"),
    ("model.num_heads=0", "model.num_heads", "an integer >= 1 or null"),
    ("train.steps=0", "train.steps", "an integer >= 1"),
    ("train.batch_size=0", "train.batch_size", "an integer >= 1"),
    ("train.lr=.inf", "train.lr", "a finite number > 0"),
    ("train.weight_decay=-1", "train.weight_decay", "a finite number >= 0"),
    ("train.warmup_steps=-1", "train.warmup_steps", "an integer >= 0"),
    ("train.lr_min_ratio=2", "train.lr_min_ratio", "a number in [0, 1]"),
    ("train.grad_clip=-1", "train.grad_clip", "a number >= 0"),
    ("train.ema_decay=1", "train.ema_decay", "a number in [0, 1)"),
    ("train.ckpt_every=0", "train.ckpt_every", "an integer >= 1"),
    ("train.log_every=0", "train.log_every", "an integer >= 1"),
    ("train.grad_accum=0", "train.grad_accum", "an integer >= 1"),
    ("train.class_dropout=1.5", "train.class_dropout", "a number in [0, 1]"),
    ("eval.n=0", "eval.n", "an integer >= 1"),
    ("eval.nfe=0", "eval.nfe", "an integer >= 1"),
    ("eval.atol=0", "eval.atol", "a finite number > 0"),
    ("eval.rtol=-1e-5", "eval.rtol", "a finite number > 0"),
    ("eval.guidance=.inf", "eval.guidance", "a finite number"),
    ("reflow.rounds=0", "reflow.rounds", "an integer >= 1"),
    ("reflow.num_pairs=0", "reflow.num_pairs", "an integer >= 1"),
    ("reflow.nfe=0", "reflow.nfe", "an integer >= 1 or null"),
    ("reflow.atol=0", "reflow.atol", "a finite number > 0"),
    ("reflow.rtol=.nan", "reflow.rtol", "a finite number > 0"),
    ("reflow.shard_size=0", "reflow.shard_size", "an integer >= 1"),
    ("reflow.steps=0", "reflow.steps", "an integer >= 1"),
    ("reflow.lr=0", "reflow.lr", "a finite number > 0"),
    ("reflow.time.scale=0", "reflow.time.scale", "a finite number > 0"),
    ("reflow.mix=-0.5", "reflow.mix", "a number in [0, 1]"),
    ("distill.steps=0", "distill.steps", "an integer >= 1"),
    ("consistency.steps=0", "consistency.steps", "an integer >= 1"),
    ("consistency.lr=0", "consistency.lr", "a finite number > 0"),
    ("consistency.num_steps=0", "consistency.num_steps", "an integer >= 1"),
    ("consistency.mu=1", "consistency.mu", "a number in [0, 1)"),
    ("consistency.ct_s0=0", "consistency.ct_s0", "an integer >= 1"),
    ("consistency.ct_s1=0", "consistency.ct_s1", "an integer >= 1"),
    ("consistency.teacher_solver=rk4", "consistency.teacher_solver", "one of euler, heun"),
    ("distill.lr=0", "distill.lr", "a finite number > 0"),
    ("lora.rank=-1", "lora.rank", "an integer >= 0"),
    ("apt.steps=0", "apt.steps", "an integer >= 1"),
    ("apt.lr_g=0", "apt.lr_g", "a finite number > 0"),
    ("apt.lr_d=-1", "apt.lr_d", "a finite number > 0"),
    ("apt.r1_lambda=-1", "apt.r1_lambda", "a finite number >= 0"),
    ("apt.r1_sigma=0", "apt.r1_sigma", "a finite number > 0"),
    ("apt.r2_lambda=-1", "apt.r2_lambda", "a finite number >= 0"),
    ("apt.t_shift=0", "apt.t_shift", "a finite number > 0"),
    ("apt.fourier_features=-1", "apt.fourier_features", "an integer >= 0"),
    ("apt.fourier_scale=0", "apt.fourier_scale", "a finite number > 0"),
    ("apt.regression_weight=-0.5", "apt.regression_weight", "a finite number >= 0"),
    ("apt.eval_every=-1", "apt.eval_every", "an integer >= 0"),
    ("apt.eval_n=1", "apt.eval_n", "an integer >= 2"),
    ("apt.eval_draws=0", "apt.eval_draws", "an integer >= 1"),
    ("apt.eval_noise=sobol", "apt.eval_noise", "one of"),
    ("apt.eval_min_gain=-0.1", "apt.eval_min_gain", "a finite number >= 0"),
    ("apt.d_steps=0", "apt.d_steps", "an integer >= 1"),
    ("apt.d_warmup=-1", "apt.d_warmup", "an integer >= 0"),
    ("apt.d_train=backbone", "apt.d_train", "one of"),
    ("apt.eval_max_copies=1.5", "apt.eval_max_copies", "a number in [0, 1]"),
    ("apt.regression_pairs=first", "apt.regression_pairs", "one of"),
    ("apt.real_from_teacher=1.5", "apt.real_from_teacher", "a number in [0, 1]"),
    ("apt.adversarial_weight=-1", "apt.adversarial_weight", "a finite number >= 0"),
    ("apt.dmd_weight=.nan", "apt.dmd_weight", "a finite number >= 0"),
    ("apt.lr_fake=0", "apt.lr_fake", "a finite number > 0"),
    ("apt.fake_steps=0", "apt.fake_steps", "an integer >= 1"),
    ("apt.lecam_weight=-0.3", "apt.lecam_weight", "a finite number >= 0"),
    ("apt.lecam_decay=1", "apt.lecam_decay", "a number in [0, 1)"),
    ("ot_cfm.steps=0", "ot_cfm.steps", "an integer >= 1"),
    ("lora.alpha=0", "lora.alpha", "a finite number > 0"),
    ("shortcut.self_consistency=1.5", "shortcut.self_consistency", "a number in [0, 1]"),
    ("shortcut.base_steps=1", "shortcut.base_steps", "an integer >= 2"),
    ("shortcut.base_steps=12", "shortcut.base_steps", "a power of two >= 2"),
    ("shortcut.ema=1", "shortcut.ema", "a number in [0, 1)"),
    ("shortcut.steps=0", "shortcut.steps", "an integer >= 1"),
    ("shortcut.lr=0", "shortcut.lr", "a finite number > 0"),
    ("shortcut.velocity=model", "shortcut.velocity", "one of data, teacher"),
    ("meanflow.velocity=flow", "meanflow.velocity", "one of data, teacher"),
    ("shortcut.start=3-RF", "shortcut.start", "one of 1-RF, 2-RF"),
    ("meanflow.start=teacher", "meanflow.start", "one of 1-RF, 2-RF"),
    ("meanflow.steps=0", "meanflow.steps", "an integer >= 1"),
    ("meanflow.lr=-1", "meanflow.lr", "a finite number > 0"),
    ("meanflow.jump_fraction=-0.1", "meanflow.jump_fraction", "a number in [0, 1]"),
    ("meanflow.logit_mean=.nan", "meanflow.logit_mean", "a finite number"),
    ("meanflow.logit_std=0", "meanflow.logit_std", "a finite number > 0"),
    ("meanflow.power=-1", "meanflow.power", "a finite number >= 0"),
    ("meanflow.eps=.inf", "meanflow.eps", "a finite number > 0"),
    ("lora.targets=[]", "lora.targets", "a non-empty list of non-empty names or null"),
    ("train.fast=sometimes", "train.fast", "one of auto, on, off"),
    ("train.precision=fp16", "train.precision", "one of auto, fp32, bf16"),
    ("reflow.bench_n=0", "reflow.bench_n", "an integer >= 1"),
    ("reflow.bench_nfes=[1,0]", "reflow.bench_nfes[1]", "an integer >= 1"),
    ("name=a/b", "name", "a non-empty file name without a path separator"),
    ("name=", "name", "a non-empty file name without a path separator"),
    ("name=..", "name", "a non-empty file name without a path separator"),
]


@pytest.mark.parametrize("override, key, valid", CONFIG_ROWS, ids=[r[0] for r in CONFIG_ROWS])
def test_config_value_out_of_range(override, key, valid):
    from flowmatch.config import ExperimentConfig, apply_overrides
    from flowmatch.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        apply_overrides(ExperimentConfig(), [override])
    assert str(e.value).startswith(f"{key} = ") and f": must be {valid}" in str(e.value), str(e.value)


def test_every_numeric_config_key_has_a_row():
    import dataclasses

    from flowmatch.config import ExperimentConfig

    numeric = set()
    for section in dataclasses.fields(ExperimentConfig):
        sub = getattr(ExperimentConfig(), section.name)
        if not dataclasses.is_dataclass(sub):
            continue
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            annotation = str(f.type)
            if (("int" in annotation or "float" in annotation) and "str" not in annotation
                    and f.name != "seed" and not isinstance(value, bool)):
                numeric.add(f"{section.name}.{f.name}")
    covered = {row[1].split("[")[0] for row in CONFIG_ROWS}
    assert numeric - covered == set()


def test_config_sections_check_their_ranges_when_built_in_python():
    from flowmatch.config import EvalConfig, ReflowConfig, TimeConfig
    from flowmatch.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^eval\.nfe = 0: must be an integer >= 1$"):
        EvalConfig(nfe=0)
    with pytest.raises(ConfigError, match=r"^time\.a = 0: must be a finite number > 0$"):
        ReflowConfig(time=TimeConfig(a=0))


def test_cli_relies_on_the_config_check(run, capsys):
    one_line_error(main(["train", run["cfg"], "--set", "eval.nfe=0", "--dry-run"]), capsys,
                   "eval.nfe = 0: must be an integer >= 1")


def _solve(**kw):
    from flowmatch.solvers import solve

    return solve(lambda x, t: -x, torch.ones(2, 1), **kw)


def _bench(**kw):
    args = dict(solvers=["euler"], nfes=[1], n=8, straightness_n=4, progress=False)
    return bench_suite({"m": lambda x, t: -x}, Gaussian(2), get_dataset("8gaussians"), **{**args, **kw})


def _write_bench(name):
    from flowmatch.bench import write_bench

    return write_bench([{"model": "m", "solver": "euler", "grid": "uniform", "nfe": 1, "w2": 1.0, "n": 8}],
                       "unused-dir", plot=False, name=name)


API_ROWS = [  # (call, key, range)
    (lambda: _solve(solver="dopri5", atol=0.0), "atol", "a finite number > 0"),
    (lambda: _solve(solver="dopri5", rtol=float("inf")), "rtol", "a finite number > 0"),
    (lambda: _solve(solver="euler", nfe=0), "nfe", "an integer >= 1"),
    (lambda: _solve(solver="euler", nfe=2.5), "nfe", "an integer >= 1"),
    (lambda: _solve(solver="euler", num_steps=0), "num_steps", "an integer >= 1"),
    (lambda: _solve(solver="dopri5", return_trajectory=True, trajectory_points=1), "trajectory_points",
     "an integer >= 2"),
    (lambda: _solve(solver="euler", nfe=4, grid="power", rho=0.0), "rho", "a finite number > 0"),
    (lambda: _solve(solver="euler", nfe=4, grid="power:inf"), "time grid power: rho", "a finite number > 0"),
    (lambda: __import__("flowmatch.solvers", fromlist=["x"]).time_grid(0), "num_steps", "an integer >= 1"),
    (lambda: __import__("flowmatch.solvers", fromlist=["x"]).get_solver("dopri5", atol=-1.0), "atol",
     "a finite number > 0"),
    (lambda: _bench(nfes=[0]), "nfes[0]", "an integer >= 1"),
    (lambda: _bench(n=0), "n", "an integer >= 1"),
    (lambda: _bench(grid_n=0), "grid_n", "an integer >= 1"),
    (lambda: _bench(straightness_n=0), "straightness_n", "an integer >= 1"),
    (lambda: _bench(likelihood_n=-1), "likelihood_n", "an integer >= 0"),
    (lambda: _write_bench("a/b"), "name", "a non-empty file name without a path separator"),
    (lambda: _write_bench(""), "name", "a non-empty file name without a path separator"),
]


@pytest.mark.parametrize("call, key, valid", API_ROWS, ids=[f"{i}-{r[1]}" for i, r in enumerate(API_ROWS)])
def test_solver_grid_and_bench_arguments_out_of_range(call, key, valid, tmp_path, monkeypatch):
    from flowmatch.errors import ConfigError

    monkeypatch.chdir(tmp_path)  # write_bench's rows would go to ./unused-dir

    with pytest.raises(ConfigError) as e:
        call()
    assert str(e.value).startswith(f"{key} = ") and f": must be {valid}" in str(e.value), str(e.value)
    assert not os.path.exists("unused-dir")
