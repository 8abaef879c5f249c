"""Learning happens, runs are deterministic, checkpoints round-trip, bad input fails early."""
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aerl_ray.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from aerl_ray.config import TrainConfig
from aerl_ray.train import DivergedError, build_parser, fit, main, read_metrics


def cfg(**kw):
    base = dict(dataset="digits", model="cnn4", epochs=15, lr=1e-3, batch_size=64, seed=0)
    return TrainConfig.from_flat({**base, **kw})


def test_sl_cnn4_reaches_95_percent(tmp_path, digits_splits):
    res = fit(cfg(regime="sl", epochs=12), tmp_path, splits=digits_splits)
    assert res.metrics["test_acc"] >= 0.95, res.metrics


def test_rl_per_sample_reaches_90_percent(tmp_path, digits_splits):
    res = fit(cfg(regime="rl", explore_eps=0.1, explore_mode="per_sample", epochs=20), tmp_path,
              splits=digits_splits)
    assert res.metrics["test_acc"] >= 0.90, res.metrics
    assert 0.5 < res.history[-1]["mean_reward"] <= 1.0


def test_outputs_metrics_tensorboard_checkpoints(tmp_path, digits_splits):
    res = fit(cfg(regime="hybrid", switch_epoch=1, epochs=3, model="tiny"), tmp_path,
              splits=digits_splits)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert [r["regime_active"] for r in rows] == ["sl", "rl", "rl"]
    keys = {"train_loss", "train_acc", "train_adv_acc", "val_acc", "input_grad_norm", "fwd_passes", "bwd_passes",
            "epoch_seconds", "wall_seconds", "mean_reward", "lr"}
    assert keys <= set(rows[-1])
    assert rows[0]["mean_reward"] is None and rows[-1]["mean_reward"] is not None
    n_train = len(digits_splits.y_train)
    assert rows[-1]["fwd_passes"] == 3 * n_train  # training passes only, validation excluded
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    assert len(ea.Scalars("train/val_acc")) == 3
    ck = load_checkpoint(tmp_path / "best.pt")
    assert ck["config"]["regime"] == "hybrid" and ck["git_rev"] and "torch" in ck["versions"]
    assert ck["seed"] == 0 and "train_state" not in ck
    assert "train_state" in load_checkpoint(tmp_path / "last.pt")
    assert json.loads((tmp_path / "final.json").read_text())["test_acc"] == res.metrics["test_acc"]


def test_deterministic_same_seed_same_weights(tmp_path, digits_splits):
    c = cfg(regime="rl_adv", model="tiny", epochs=2, augment=True)
    a = fit(c, tmp_path / "a", splits=digits_splits).model.state_dict()
    b = fit(c, tmp_path / "b", splits=digits_splits).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    d = fit(c.replace(seed=1), tmp_path / "c", splits=digits_splits).model.state_dict()
    assert not all(torch.equal(a[k], d[k]) for k in a)


def test_resume_continues_exactly(tmp_path, digits_splits):
    c = cfg(regime="rl", model="tiny", epochs=4, final_lr_ratio=0.1, warmup_epochs=1)
    full = fit(c, tmp_path / "full", splits=digits_splits)
    # a crash after epoch 1: the per-epoch hook raises, leaving last.pt of epoch 1
    from aerl_ray.train import WorkerContext, train_loop

    class Stop(Exception):
        pass

    def stop_after_1(m, out):
        if m["epoch"] == 1:
            raise Stop

    mid = tmp_path / "mid"
    mid.mkdir()
    with pytest.raises(Stop):
        train_loop(c, mid, WorkerContext(on_epoch=stop_after_1, splits=digits_splits))
    resumed = fit(c, mid, resume=True, splits=digits_splits)
    assert [r["epoch"] for r in read_metrics(mid / "metrics.jsonl")] == [0, 1, 2, 3]
    fs, rs = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.allclose(fs[k], rs[k]) for k in fs)
    assert resumed.metrics["fwd_passes"] == full.metrics["fwd_passes"]


def test_checkpoint_round_trip_and_tampering(tmp_path, digits_splits):
    res = fit(cfg(model="tiny", epochs=1), tmp_path, splits=digits_splits)
    model, info = model_from_checkpoint(tmp_path / "best.pt")
    x = digits_splits.x_test[:16]
    assert torch.equal(model(x), res.model(x))
    with pytest.raises(CheckpointError, match="holds a 'tiny' model, not 'cnn4'"):
        model_from_checkpoint(tmp_path / "best.pt", model_name="cnn4")
    ck = load_checkpoint(tmp_path / "best.pt")
    ck["config"]["model"] = "cnn4"  # weights of one architecture labelled as another
    with pytest.raises(CheckpointError, match="do not fit a 'cnn4' model"):
        model_from_checkpoint(ck)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "aerl_ray.checkpoint/1", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="will not be unpickled"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "best.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "trunc.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_diverging_run_stops_with_reason(tmp_path, digits_splits):
    with pytest.raises(DivergedError, match="lower the learning rate"):
        fit(cfg(model="tiny", lr=1e30, epochs=3, weight_decay=0.0), tmp_path, splits=digits_splits)


def test_cli_help_documents_every_flag(capsys):
    from aerl_ray.config import flat_fields

    text = build_parser().format_help()
    for name in flat_fields():
        assert "--" + name.replace("_", "-") in text


@pytest.mark.parametrize("argv, match", [
    (["--regime", "dqn"], "known regimes"),
    (["--epochs", "3", "--regime", "hybrid", "--switch-epoch", "3"], "switch_epoch=3"),
    (["--lr", "-1"], "lr=-1.0 must be > 0"),
    (["--lr", "-1e-3"], "lr=-0.001 must be > 0"),  # argparse alone: "expected one argument"
    (["--dataset", "npz:/no/such.npz"], "does not exist"),
])
def test_cli_bad_input_exits_2_before_training(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "o"), *argv])
    assert e.value.code == 2
    assert __import__("re").search(match, capsys.readouterr().err)
    assert not (tmp_path / "o" / "last.pt").exists()


def test_cli_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "aerl_ray.train", "--dataset", "digits",
                          "--model", "tiny", "--regime", "rl", "--epochs", "2",
                          "--explore-eps", "0.1", "--lr", "1e-3", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "test_acc" in out.stdout
    assert (tmp_path / "best.pt").exists() and (tmp_path / "metrics.jsonl").exists()


def test_pass_budget_gives_equal_compute_across_regimes(tmp_path, digits_splits):
    """SL (1 forward + a training backward of 2 forward-equivalents per example: 3) and
    RL-adv (6) stop at the same pass budget."""
    n = len(digits_splits.y_train)
    budget = 9 * n  # 3 SL epochs, 1.5 RL-adv epochs
    runs = {}
    for regime in ("sl", "rl_adv"):
        res = fit(cfg(regime=regime, model="tiny", epochs=10, pass_budget=budget,
                      final_lr_ratio=0.0), tmp_path / regime, splits=digits_splits)
        spent = res.metrics["fwd_passes"] + res.metrics["bwd_passes"]
        assert budget <= spent < budget + 6 * 64 * 2, (regime, spent)
        runs[regime] = res
    assert len(runs["sl"].history) == 3 and len(runs["rl_adv"].history) == 2
    # the lr schedule decays over the budget, not over the 10-epoch upper bound
    assert runs["sl"].history[-1]["lr"] < 0.1 * 1e-3


def test_cli_run_dir_faults(tmp_path, capsys):
    """--out onto a run refuses; --resume of a finished run changes nothing; --resume of
    nothing refuses; --overwrite replaces."""
    out = tmp_path / "run"
    args = ["--dataset", "digits", "--model", "tiny", "--epochs", "2", "--out", str(out),
            "--log-level", "WARNING"]
    assert main(args) == 0
    final = (out / "final.json").read_text()
    last = (out / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(args)  # the same --out again
    assert e.value.code == 2 and "already holds a run" in capsys.readouterr().err
    assert (out / "last.pt").read_bytes() == last
    assert main([*args, "--resume"]) == 0  # finished: nothing to do, nothing damaged
    assert (out / "final.json").read_text() == final and (out / "last.pt").read_bytes() == last
    assert "test_acc" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([*args[:-4], "--out", str(tmp_path / "nothing"), "--resume"])
    assert e.value.code == 2 and "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(SystemExit) as e:
        main([*args, "--resume", "--lr", "0.5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "lr: 0.001 -> 0.5" in err
    assert main([*args, "--overwrite", "--epochs", "1"]) == 0
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [0]


def test_resumed_run_reports_its_whole_compute(tmp_path, digits_splits):
    """A run resumed after its last epoch was checkpointed (killed before final.json)
    reports the passes and seconds of all its epochs, not zero."""
    c = cfg(regime="sl", model="tiny", epochs=2)
    full = fit(c, tmp_path / "a", splits=digits_splits)
    (tmp_path / "a" / "final.json").unlink()  # killed between the last epoch and the end
    again = fit(c, tmp_path / "a", resume=True, splits=digits_splits)
    assert again.history == []  # nothing was trained again ...
    assert again.metrics["fwd_passes"] == full.metrics["fwd_passes"] > 0  # ... and all counted
    assert again.metrics["wall_seconds"] == pytest.approx(full.metrics["wall_seconds"])


# --- the learning-rate schedule ---------------------------------------------------------
def _lrs_used(total: int, warmup: int, final: float) -> list[float]:
    """The lr factor each of ``total`` optimiser steps really uses (LambdaLR as the loop
    drives it: one sched.step() after each optimiser step)."""
    from aerl_ray.train import lr_factor

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup,
                                                                       final))
    used = []
    for _ in range(total):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return used


def test_lr_reaches_the_final_ratio_on_the_last_step():
    """10 steps, 2 of warm-up, decay to 0.1: the 10th step uses 0.1 (was 0.2125)."""
    used = _lrs_used(10, 2, 0.1)
    assert used[:2] == [0.5, 1.0]
    assert used[-1] == pytest.approx(0.1)
    assert used[0] < used[1] and all(a > b for a, b in zip(used[1:], used[2:]))


@settings(deadline=None, max_examples=60)  # timing-free: the machine is shared
@given(total=st.integers(1, 300), warmup=st.integers(0, 50),
       final=st.floats(0.0, 1.0, allow_nan=False))
def test_lr_schedule_properties(total, warmup, final):
    """Warm-up rises to 1, then the factor never increases, stays in [final, 1] and the
    last step uses exactly ``final`` (when there is a step after the warm-up)."""
    warmup = min(warmup, total - 1) if total > 1 else 0
    used = _lrs_used(total, warmup, final)
    assert all(final - 1e-12 <= u <= 1.0 + 1e-12 for u in used[warmup:])
    assert all(b <= a + 1e-12 for a, b in zip(used[max(warmup - 1, 0):],
                                              used[max(warmup, 1):]))
    if total - 1 > max(warmup - 1, 0):
        assert used[-1] == pytest.approx(final, abs=1e-12)
    if warmup:
        assert used[warmup - 1] == pytest.approx(1.0)


# --- what the metrics call training accuracy ---------------------------------------------
@pytest.mark.parametrize("attack, clean, adv", [
    ("fgsm", True, True), ("trades", True, True), ("pgd", False, True),
    ("fgsm_rs", False, True)])
def test_train_accuracy_is_named_clean_or_adversarial(tmp_path, digits_splits, attack, clean,
                                                      adv):
    """train_acc is accuracy on the clean inputs, train_adv_acc on the adversarial ones;
    None where the regime does not compute them (the old train_acc meant adversarial
    accuracy for pgd/fgsm_rs and clean for fgsm/trades)."""
    res = fit(cfg(regime="sl_adv", adv_attack=attack, adv_steps=2, adv_eps=0.3, model="tiny",
                  epochs=1, train_limit=256), tmp_path, splits=digits_splits)
    m = res.history[-1]
    assert (m["train_acc"] is not None) == clean
    assert (m["train_adv_acc"] is not None) == adv
    if clean and adv:  # at eps 0.3 the adversarial inputs are much harder
        assert m["train_adv_acc"] < m["train_acc"]
    plain = fit(cfg(regime="sl", model="tiny", epochs=1), tmp_path / "sl",
                splits=digits_splits).history[-1]
    assert plain["train_acc"] is not None and plain["train_adv_acc"] is None


def test_best_checkpoint_is_the_epoch_of_best_validation_accuracy(tmp_path, digits_splits,
                                                                  monkeypatch):
    """The current selection rule (best clean validation accuracy, first epoch on ties):
    best.pt holds that epoch's weights."""
    import aerl_ray.train as train_mod

    vals = iter([0.5, 0.8, 0.8, 0.6])
    real = train_mod.accuracy

    def scripted(model, x, y, batch, device):
        return next(vals) if x is digits_splits.x_val else real(model, x, y, batch, device)

    monkeypatch.setattr(train_mod, "accuracy", scripted)
    res = fit(cfg(model="tiny", epochs=4), tmp_path, splits=digits_splits)
    assert res.metrics["best_epoch"] == 1 and res.metrics["best_val_acc"] == 0.8
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert [r["selected_epoch"] for r in res.history] == [0, 1, 1, 1]
