"""Images end to end on the 8x8 digits with the tiny UNet: training and its evaluation (classifier
Fréchet distance), class conditioning with guidance, pair generation with labels, paired training,
the bench with image metrics, and a two-round reflow chain with distillation."""

from __future__ import annotations

import json
import os

import pytest
import torch

from flowmatch.bench import ImageScorer, pareto_table
from flowmatch.config import apply_overrides, from_dict
from flowmatch.data.pairs import PairStore
from flowmatch.data.task import build_task, data_shape, num_classes
from flowmatch.errors import ConfigError
from flowmatch.evaluation import LabeledField, sampling_field
from flowmatch.models import build_model
from flowmatch.pipelines import bench_checkpoints, train_from_config
from flowmatch.reflow import generate_pairs
from flowmatch.reflow_chain import reflow_from_config
from flowmatch.reports import IMAGE_STAGE_COLUMNS, reflow_targets
from flowmatch.training import load_model


def _cfg(**over):
    base = {
        "name": "digits_tiny",
        "data": {"source": "gaussian", "target": "digits"},
        "model": {"name": "unet", "preset": "tiny"},
        "train": {"steps": 30, "batch_size": 32, "lr": 2e-3, "warmup_steps": 5, "ckpt_every": 30, "log_every": 10,
                  "ema_decay": 0.9, "device": "cpu"},
        "eval": {"n": 64, "solver": "euler", "nfe": 4, "atol": 1e-3, "rtol": 1e-3},
        "tracking": {"mode": "disabled"},
        "reflow": {"num_pairs": 96, "shard_size": 48, "solver": "euler", "nfe": 4, "steps": 20,
                   "bench_n": 64, "bench_solvers": ["euler", "dopri5"], "bench_nfes": [1, 2], "rounds": 2,
                   "distill": True},
        "distill": {"steps": 20},
    }
    for key, value in over.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(base)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("digits") / "run")
    return train_from_config(_cfg(), out, progress=False), out


def test_task_shapes_and_sources():
    cfg = _cfg()
    task = build_task(cfg.data)
    assert task.is_image and task.shape == (1, 8, 8) and task.num_classes == 10
    assert data_shape(cfg.data) == (1, 8, 8) and num_classes(cfg.data) == 10
    x0 = task.source.sample(5, generator=torch.Generator().manual_seed(0))
    assert x0.shape == (5, 1, 8, 8)
    assert build_task(cfg.data, split="test").target.split == "test"
    with pytest.raises(ConfigError, match="data.source=gaussian"):
        build_task(apply_overrides(cfg, ["data.source=moons"]).data)
    with pytest.raises(ConfigError, match="image_size"):
        data_shape(apply_overrides(cfg, ["data.target=folder", "data.root=/nonexistent"]).data)


def test_model_choice_errors():
    cfg = _cfg()
    with pytest.raises(ConfigError, match="use model.name=unet"):
        build_model(apply_overrides(cfg, ["model.name=mlp"]).model, (1, 8, 8))
    with pytest.raises(ConfigError, match="square images"):
        build_model(cfg.model, (2,))
    with pytest.raises(ConfigError, match="class labels"):
        build_model(apply_overrides(cfg, ["model.class_cond=true"]).model, (1, 8, 8), None)
    with pytest.raises(ConfigError, match="attention"):  # the small preset attends at 7x7: not a size of 8x8 inputs
        build_model(apply_overrides(cfg, ["model.preset=small"]).model, (1, 8, 8))


def test_train_and_evaluate_images(run):
    summary, out = run
    ev = summary.eval
    for key in ("eval/fd", "eval/fd_floor", "eval/kid", "eval/straightness"):
        assert key in ev and ev[key] == ev[key], key
    assert "eval/w2" not in ev
    assert ev["eval/fd"] > ev["eval/fd_floor"] > 0  # 30 steps of a tiny UNet are far from the data
    for name in ("samples.png", "trajectories.png"):
        assert os.path.getsize(os.path.join(out, "plots", name)) > 1000
    samples = torch.load(os.path.join(out, "samples.pt"), weights_only=True)["samples"]
    assert samples.shape == (64, 1, 8, 8)
    lm = load_model(summary.checkpoint)
    assert lm.model.input_shape == (1, 8, 8)


def test_class_conditional_training_pairs_and_paired_student(tmp_path):
    cfg = _cfg(model={"class_cond": True}, train={"steps": 20, "ckpt_every": 20})
    s = train_from_config(cfg, str(tmp_path / "cond"), progress=False)
    lm = load_model(s.checkpoint)
    assert lm.model.num_classes == 10
    f = sampling_field(lm.model, 12, guidance=2.0)
    assert isinstance(f, LabeledField) and f.labels.tolist() == [i % 10 for i in range(12)]
    x = torch.randn(5, 1, 8, 8)
    t = torch.full((5,), 0.5)
    with torch.no_grad():
        v = f(x, t)
        vc = lm.model(x, t, torch.arange(5))
        vu = lm.model(x, t, torch.full((5,), 10))
    torch.testing.assert_close(v, vu + 2.0 * (vc - vu), rtol=1e-4, atol=1e-5)

    m = generate_pairs(s.checkpoint, str(tmp_path / "pairs"), 40, solver="euler", nfe=2, shard_size=20,
                       progress=False)
    assert m["labeled"] and m["shape"] == [1, 8, 8]
    store = PairStore(str(tmp_path / "pairs"), expect_shape=[1, 8, 8])
    assert store.y is not None and store.y.shape == (40,) and int(store.y.max()) < 10
    # the same seed and shard give the same labels and pairs again
    generate_pairs(s.checkpoint, str(tmp_path / "pairs2"), 40, solver="euler", nfe=2, shard_size=20, progress=False)
    again = PairStore(str(tmp_path / "pairs2"))
    assert torch.equal(again.y, store.y) and torch.equal(again.x1, store.x1)

    student = apply_overrides(cfg, ["coupling.name=paired", f"coupling.pairs={tmp_path / 'pairs'}", "train.steps=5",
                                    "train.ckpt_every=5", "eval.n=20"])
    s2 = train_from_config(student, str(tmp_path / "student"), progress=False)
    assert s2.step == 5 and s2.eval["eval/fd"] == s2.eval["eval/fd"]


def test_bench_on_images(run, tmp_path, monkeypatch):
    summary, _ = run
    logged = []

    class FakeTracker:  # the wandb side of the bench, recorded instead of written
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def log(self, row, step):
            logged.append(row)

        def log_table(self, key, rows):
            logged.append({key: len(rows)})

        def log_image(self, key, path, step=None):
            logged.append({key: path})

    import flowmatch.pipelines as pipelines

    monkeypatch.setattr(pipelines, "Tracker", FakeTracker)
    res = bench_checkpoints([summary.checkpoint], str(tmp_path / "bench"), solvers=["euler", "dopri5"], nfes=[1, 4],
                            n=48, tracking="offline", progress=False, atol=1e-3, rtol=1e-3)
    assert any(k.endswith("/euler/uniform/nfe1/fd") for row in logged for k in row)
    row = res.rows[0]
    assert {"fd", "fd_floor", "kid"} <= set(row) and "w2" not in row
    assert {r["solver"] for r in res.rows} == {"euler", "dopri5"}
    one = next(r for r in res.rows if r["solver"] == "euler" and r["nfe"] == 1)
    four = next(r for r in res.rows if r["solver"] == "euler" and r["nfe"] == 4)
    assert one["fd"] != four["fd"]
    assert "fd" in pareto_table(res.rows) or "NFE" in pareto_table(res.rows)
    md = open(tmp_path / "bench" / "bench.md").read()
    assert "| fd |" in md.replace("fd_floor", "") or " fd " in md
    assert os.path.exists(tmp_path / "bench" / "bench_pareto.png")


def test_image_scorer_floor_uses_held_out_images():
    class Metrics:
        def fd(self, x):
            return float(x.mean())

        def kid(self, x, generator=None):
            return float(x.std()), 0.0

    sc = ImageScorer(Metrics(), torch.arange(10.0).reshape(10, 1, 1, 1))
    assert sc.floor(4) == {"fd_floor": 1.5, "fd_floor_n": 4}
    assert sc.floor(50)["fd_floor_n"] == 10  # the held-out split has only 10
    assert sc(torch.ones(3, 1, 1, 1)) == {"fd": 1.0, "kid": 0.0}


def test_reflow_chain_on_digits(tmp_path):
    cfg = _cfg(train={"steps": 20, "ckpt_every": 20})
    rows = reflow_from_config(cfg, str(tmp_path / "chain"), progress=False)
    assert [r["stage"] for r in rows if r["solver"] == "dopri5"] == ["1-RF", "2-RF", "2-RF+distill"]
    assert tuple(rows[0])[: len(IMAGE_STAGE_COLUMNS)] == IMAGE_STAGE_COLUMNS
    stages = json.load(open(tmp_path / "chain" / "stages.json"))
    assert stages[0]["fd"] == rows[0]["fd"]
    for stage in ("1-RF", "2-RF", "2-RF+distill"):
        assert os.path.getsize(tmp_path / "chain" / "plots" / "samples" / f"{stage}.png") > 1000
    assert os.path.exists(tmp_path / "chain" / "plots" / "fd_vs_nfe.png")
    t = reflow_targets([{**r, "task": "digits"} for r in rows])[0]
    assert t["distilled Euler-1 FD / 1-RF dopri5 FD"] == pytest.approx(
        next(r["fd"] for r in rows if r["stage"] == "2-RF+distill" and r["nfe"] == 1)
        / next(r["fd"] for r in rows if r["stage"] == "1-RF" and r["solver"] == "dopri5"))


def test_cli_reports_image_input_errors(tmp_path, capsys):
    from flowmatch.cli import main

    cfg = os.path.join(os.path.dirname(__file__), "..", "experiments", "mnist", "mnist.yaml")
    missing = tmp_path / "no-such-root"
    clf = tmp_path / "mnist_clf.pt"
    clf.write_bytes(b"weights")  # present: the missing data root is what fails
    assert main(["train", cfg, "--set", f"data.root={missing}", "--set", f"eval.classifier={clf}",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "flowmatch: error:" in err and str(missing) in err
    assert not (tmp_path / "run").exists()  # nothing written
    bad_clf = tmp_path / "clf.pt"
    bad_clf.write_bytes(b"not a checkpoint")
    digits = os.path.join(os.path.dirname(__file__), "..", "experiments", "images", "digits.yaml")
    rc = main(["train", digits, "--set", "model.preset=tiny", "--set", "model.attention_resolutions=[]",
               "--set", "train.steps=1", "--set", "eval.n=8", "--set", "eval.solver=euler", "--set", "eval.nfe=1",
               "--set", "tracking.mode=disabled", "--set", f"eval.classifier={bad_clf}",
               "--out", str(tmp_path / "run2"), "--no-progress"])
    assert rc == 2
    assert str(bad_clf) in capsys.readouterr().err
    assert os.path.exists(tmp_path / "run2" / "checkpoints" / "last.pt")  # the trained checkpoint is kept


def test_missing_metric_weights_are_refused_before_training(tmp_path, capsys):
    from flowmatch.cli import main

    digits = os.path.join(os.path.dirname(__file__), "..", "experiments", "images", "digits.yaml")
    for key in ("eval.classifier", "eval.inception"):
        missing = tmp_path / f"{key}.pt"
        assert main(["train", digits, "--set", f"{key}={missing}", "--out", str(tmp_path / "run")]) == 2
        assert f"{key}: no such weights file {missing}" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_image_task_without_a_feature_classifier_is_refused_before_training(tmp_path):
    from flowmatch.errors import FlowmatchError

    cfg = _cfg(data={"target": "folder", "root": str(tmp_path / "imgs"), "image_size": 8, "channels": 1})
    with pytest.raises(FlowmatchError, match="eval.classifier"):
        train_from_config(cfg, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_samples_of_a_class_conditional_model_carry_their_labels(tmp_path):
    from flowmatch.pipelines import sample_from_checkpoint

    cfg = _cfg(model={"class_cond": True}, train={"steps": 2, "ckpt_every": 2}, eval={"n": 16, "guidance": 1.5})
    s = train_from_config(cfg, str(tmp_path / "cond"), progress=False)
    rec = sample_from_checkpoint(s.checkpoint, str(tmp_path / "s.pt"), n=12, nfe=2, batch_size=5, progress=False)
    out = torch.load(tmp_path / "s.pt", weights_only=True)
    assert rec["guidance"] == 1.5 and out["y"].tolist() == [i % 10 for i in range(12)]
    assert out["samples"].shape == (12, 1, 8, 8)


def test_a_run_saved_before_new_config_keys_resumes(tmp_path):
    """A checkpoint whose config lacks keys added later compares at their defaults."""
    cfg = from_dict({"name": "old", "data": {"source": "gaussian", "target": "moons"},
                     "model": {"hidden": 16, "depth": 2}, "tracking": {"mode": "disabled"},
                     "train": {"steps": 4, "ckpt_every": 2, "log_every": 2, "device": "cpu"},
                     "eval": {"n": 50, "solver": "euler", "nfe": 2, "plots": False}})
    out = str(tmp_path / "run")
    first = train_from_config(cfg, out, progress=False)
    ck = torch.load(first.checkpoint, weights_only=True)
    for section, key in (("data", "split"), ("model", "preset"), ("model", "class_cond"), ("train", "grad_accum"),
                         ("eval", "guidance")):
        del ck["config"][section][key]
    torch.save(ck, first.checkpoint)
    again = train_from_config(cfg, out, resume="auto", progress=False)
    assert again.skipped  # the finished run is recognised as the same run
    longer = train_from_config(apply_overrides(cfg, ["train.steps=6"]), out, resume=True, progress=False)
    assert longer.step == 6


def test_stage_columns_of_toy_image_and_mixed_tables():
    from flowmatch.reports import STAGE_COLUMNS, stage_columns

    toy, img = {"w2": 0.1}, {"fd": 1.0}
    assert stage_columns([toy]) == STAGE_COLUMNS and stage_columns([img]) == IMAGE_STAGE_COLUMNS
    both = stage_columns([toy, img])
    assert {"w2", "w2_floor", "mmd", "fd", "fd_floor", "kid"} <= set(both) and len(both) == len(set(both))


def test_few_step_table_on_images(run, tmp_path):
    """CD on the digits from the module's 1-RF: scored by classifier FD, its two-step re-noising time
    chosen on a validation draw."""
    from flowmatch.few_step import few_step_from_config

    cfg = _cfg(consistency={"steps": 5, "num_steps": 4},
               reflow={"bench_solvers": ["euler"], "bench_nfes": [1], "teacher": run[0].checkpoint})
    rows = few_step_from_config(cfg, str(tmp_path), methods=["cd"], progress=False)
    cd = [r for r in rows if r["method"] == "cd"]
    assert {"fd", "fd_floor", "kid"} <= set(cd[0]) and all(r["fd"] == r["fd"] for r in cd)
    assert sum(r.get("t1") is not None for r in cd) == 1 and cd[0]["teacher_evals"] == 5 * 32
    # the memorisation check of every method: the teacher by dopri5, the rest in one step, on the bench's draws
    from flowmatch.data.task import build_source
    from flowmatch.evaluation import image_memorisation
    from flowmatch.solvers import solve

    memo = json.loads((tmp_path / "few_step_memorisation.json").read_text())
    assert list(memo) == ["1-RF", "cd"] and memo["1-RF"]["sampler"] == "dopri5"
    assert memo["cd"]["sampler"] == "euler nfe 1"
    x0 = build_source(cfg.data).sample(64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x1 = solve(load_model(run[0].checkpoint).model, x0, "dopri5", atol=1e-3, rtol=1e-3).x1
    want = image_memorisation(cfg, x1)["features"].summary()
    assert memo["1-RF"]["features"] == pytest.approx(want)
    # and the same samples' precision and recall against the training images
    from flowmatch.evaluation import precision_recall_checker

    pr = precision_recall_checker(cfg)(x1)
    assert (memo["1-RF"]["precision"], memo["1-RF"]["recall"]) == pytest.approx((pr.precision, pr.recall))
    summary = (tmp_path / "few_step_summary.md").read_text()
    assert "| 1-RF | dopri5 |" in summary and "| cd | euler nfe 1 |" in summary
    assert "| memorises | precision | recall |" in summary
    assert f"| {memo['cd']['precision']:.3f} | {memo['cd']['recall']:.3f} |" in summary


def test_anystep_methods_on_images(run, tmp_path, monkeypatch):
    """Shortcut and MeanFlow from the module's 1-RF on the digits (a step-input UNet from the teacher's
    weights): scored by classifier FD at NFE 1, 2, 4, 8 of their jumps; their memorisation check by one jump."""
    import flowmatch.few_step as fs
    from flowmatch.few_step import TABLE_NFES, few_step_from_config

    import flowmatch.evaluation
    import flowmatch.pipelines

    monkeypatch.setattr(fs, "TEACHER_SOLVERS", ())  # the teacher's Euler row alone (its best-solver rows: the toy tests)
    for module in (flowmatch.evaluation, flowmatch.pipelines):  # straightness (RK4, 64 steps) on 8 images, not 128
        monkeypatch.setattr(module, "straightness_n", lambda image: 8)

    cfg = _cfg(shortcut={"steps": 3, "base_steps": 8}, meanflow={"steps": 3}, eval={"plots": False},
               reflow={"bench_solvers": ["euler"], "bench_nfes": [1], "teacher": run[0].checkpoint})
    rows = few_step_from_config(cfg, str(tmp_path), methods=["shortcut", "meanflow"], progress=False)
    for m in ("shortcut", "meanflow"):
        rs = [r for r in rows if r["method"] == m]
        assert sorted(r["nfe"] for r in rs) == list(TABLE_NFES) and all(r["fd"] == r["fd"] for r in rs)
        assert rs[0]["steps"] == 3 and rs[0]["teacher_evals"] == 0  # a given teacher: its own steps only
    memo = json.loads((tmp_path / "few_step_memorisation.json").read_text())
    assert memo["shortcut"]["sampler"] == memo["meanflow"]["sampler"] == "anystep nfe 1"
    assert "fd NFE 8" in (tmp_path / "few_step_summary.md").read_text()


def test_paired_fd_scores_every_entry_on_the_same_noise(tmp_path):
    # experiments/images/paired_fd.py: image models on the same draws of noise, paired against the student
    import subprocess
    import sys

    from flowmatch.cli import main

    digits = os.path.join(os.path.dirname(__file__), "..", "experiments", "images", "digits.yaml")
    assert main(["train", digits, "--set", "model.preset=tiny", "--set", "model.attention_resolutions=[]",
                 "--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "eval.n=8",
                 "--set", "eval.solver=euler", "--set", "eval.nfe=1", "--set", "tracking.mode=disabled",
                 "--out", str(tmp_path / "run" / "A"), "--no-progress"]) == 0
    script = os.path.join(os.path.dirname(__file__), "..", "experiments", "images", "paired_fd.py")
    ckpt = str(tmp_path / "run" / "A" / "checkpoints" / "last.pt")
    subprocess.run([sys.executable, script, str(tmp_path / "run"), "--student", "A", "--teacher", "A",
                    "--also", f"{ckpt}:euler:1", "--also", "A:euler:2", "--draws", "2", "--n", "32",
                    "--memorisation", "--precision-recall", "--fd-terms", "--classes"], check=True, capture_output=True,
                   timeout=300)
    paired = json.loads((tmp_path / "run" / "paired_fd.json").read_text())
    s, summary = paired["scores"], paired["summary"]
    assert list(s) == ["student euler 1", "teacher dopri5", f"{ckpt} euler 1", "A euler 2"]
    assert all(len(v["fd"]) == len(v["fd_test"]) == len(v["copies_features"]) == 2 for v in s.values())
    assert all(0 <= c <= 1 for v in s.values() for c in v["copies_pixels"] + v["copies_features"])
    # precision and recall against the training images, in the classifier's features, as computed here
    from flowmatch.evaluation import precision_recall_checker
    from flowmatch.solvers import solve

    model = load_model(ckpt)
    x0 = build_task(model.config.data).source.sample(32, generator=torch.Generator().manual_seed(10_000))
    with torch.no_grad():
        pr = precision_recall_checker(model.config)(solve(model.model.eval(), x0, "euler", nfe=1).x1)
    assert (s["student euler 1"]["precision"][0], s["student euler 1"]["recall"][0]) == \
        pytest.approx((pr.precision, pr.recall))
    # the class structure through the task's classifier, and the held-out test images' own beside it
    from flowmatch.evaluation import class_balance_checker

    check = class_balance_checker(model.config)
    with torch.no_grad():
        cb = check(solve(model.model.eval(), x0, "euler", nfe=1).x1)
    assert (s["student euler 1"]["class_tv"][0], s["student euler 1"]["ambiguous"][0]) == \
        pytest.approx((cb.class_tv, cb.ambiguous))
    real = check(build_task(model.config.data, split="test").target.tensors()[0])
    assert paired["reference"]["test images"] == {"n": 297, "class_tv": pytest.approx(real.class_tv),
                                                  "ambiguous": pytest.approx(real.ambiguous)}
    assert all(len(v["class_tv"]) == len(v["ambiguous"]) == 2 for v in s.values())
    assert all(len(v["precision"]) == len(v["recall"]) == 2 for v in s.values())
    # fd's two parts, per draw: they sum to fd
    assert all(a + b == pytest.approx(fd, rel=1e-9, abs=1e-12)
               for v in s.values() for a, b, fd in zip(v["fd_mean"], v["fd_cov"], v["fd"]))
    assert "vs_teacher" in summary["A euler 2"]["recall"]
    # against the teacher as against the student: the per-draw difference's mean
    got = summary["A euler 2"]["copies_features"]["vs_teacher"]["diff"]
    assert got == pytest.approx(sum(a - b for a, b in zip(s["A euler 2"]["copies_features"],
                                                          s["teacher dopri5"]["copies_features"])) / 2)
    assert "vs_teacher" not in summary["teacher dopri5"]["fd"] and "vs_student" not in summary["student euler 1"]["fd"]
    # the same checkpoint and solver on the same noise: the same scores to the bit, a paired ratio of exactly 1
    assert s[f"{ckpt} euler 1"] == s["student euler 1"]
    assert summary[f"{ckpt} euler 1"]["fd"]["vs_student"] == {"ratio": 1.0, "ratio_se": 0.0, "diff": 0.0,
                                                             "diff_se": 0.0}
    two, one = s["A euler 2"]["fd"], s["student euler 1"]["fd"]
    assert two != one
    assert summary["A euler 2"]["fd"]["vs_student"]["ratio"] == pytest.approx((two[0] / one[0] + two[1] / one[1]) / 2)
    assert summary["A euler 2"]["fd_test"]["mean"] == pytest.approx(sum(s["A euler 2"]["fd_test"]) / 2)
    bad = subprocess.run([sys.executable, script, str(tmp_path / "run"), "--student", "B"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "B: no checkpoint at" in bad.stderr
