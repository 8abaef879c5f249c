"""The fast-path options on the CPU: bf16 autocast, channels_last, compile (and its
fallback), device-side draws, sums on the device, config fields, bench/gpu.py --smoke."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aerl_ray import fastpath, rng
from aerl_ray.config import ConfigError, TrainConfig
from aerl_ray.regimes import RegimeContext
from aerl_ray.regimes.policy_gradient import sample_actions
from aerl_ray.train import fit, with_defaults

ROOT = Path(__file__).resolve().parents[1]


def cfg(**kw):
    base = dict(dataset="digits", model="tiny", epochs=1, lr=3e-2, batch_size=64, seed=0,
                device="cpu")
    return TrainConfig.from_flat({**base, **kw})


def test_config_fields_validated_flat_and_old_checkpoints():
    c = cfg(precision="bf16", channels_last=True, compile=True, cudnn_benchmark=True)
    flat = c.to_flat()
    assert flat["precision"] == "bf16" and flat["compile"] is True
    assert TrainConfig.from_flat(flat) == c
    with pytest.raises(ConfigError, match="precision='fp16' is not valid; choose one of: "
                                          "fp32, bf16"):
        cfg(precision="fp16")
    old = {k: v for k, v in cfg().to_flat().items()
           if k not in ("precision", "channels_last", "compile", "cudnn_benchmark",
                        "resident_data")}
    assert with_defaults(old) == cfg().to_flat()  # a pre-fast-path last.pt still resumes


def test_fast_path_fields_are_searchable():
    from aerl_ray.space import SpaceError, _parse_param

    for name, choices in (("precision", ["fp32", "bf16"]), ("channels_last", [False, True]),
                          ("compile", [False, True]), ("cudnn_benchmark", [False, True]),
                          ("resident_data", [True, False])):
        p = _parse_param("space.yaml", name, {"type": "categorical", "choices": choices},
                         [], {})
        for v in p.choices:
            assert getattr(cfg(**{name: v}), name) in (v, type(cfg().precision)(v)
                                                       if name == "precision" else v)
    with pytest.raises(SpaceError, match="unknown parameter"):
        _parse_param("space.yaml", "precison", {"type": "categorical", "choices": ["bf16"]},
                     [], {})


def test_bf16_unsupported_cuda_device_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    with pytest.raises(RuntimeError, match="does not support bfloat16.*--precision fp32"):
        fastpath.check_precision("bf16", torch.device("cuda"))
    fastpath.check_precision("fp32", torch.device("cuda"))
    fastpath.check_precision("bf16", torch.device("cpu"))


def test_bf16_and_fp32_training_reach_the_same_accuracy_band(tmp_path, digits_splits):
    runs = {p: fit(cfg(precision=p, epochs=3, model="cnn4", lr=2e-3), tmp_path / p,
                   splits=digits_splits) for p in ("fp32", "bf16")}
    f32, b16 = (runs[p].metrics for p in ("fp32", "bf16"))
    # autocast really ran: the bf16 losses differ from fp32's ...
    assert b16["train_loss"] != f32["train_loss"]
    # ... and both land in the same band
    assert f32["val_acc"] >= 0.85 and b16["val_acc"] >= 0.85, (f32, b16)
    assert abs(f32["val_acc"] - b16["val_acc"]) <= 0.05, (f32, b16)
    assert runs["bf16"].model.net[0].weight.dtype == torch.float32  # weights stay fp32


def test_bf16_autocast_reaches_the_regime(tmp_path, digits_splits):
    from aerl_ray.regimes import REGIMES
    from aerl_ray.regimes.supervised import ce_loss

    seen = []

    def probe(model, x, y, ctx):
        logits = model(x)
        seen.append(logits.dtype)
        return ce_loss(logits, y, ctx)

    REGIMES.register("_probe_dtype")(probe)
    try:
        fit(cfg(regime="_probe_dtype", precision="bf16", train_limit=0), tmp_path / "b",
            splits=digits_splits)
        fit(cfg(regime="_probe_dtype"), tmp_path / "f", splits=digits_splits)
    finally:
        REGIMES._items.pop("_probe_dtype", None)
    n = len(seen) // 2
    assert set(seen[:n]) == {torch.bfloat16} and set(seen[n:]) == {torch.float32}


def test_channels_last_trains_the_same_model(tmp_path, digits_splits):
    ref = fit(cfg(model="cnn4"), tmp_path / "a", splits=digits_splits)
    cl = fit(cfg(model="cnn4", channels_last=True), tmp_path / "b", splits=digits_splits)
    w = cl.model.net[2].weight  # (64, 32, 3, 3): the formats differ
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert cl.metrics["train_loss"] == pytest.approx(ref.metrics["train_loss"], rel=1e-3)
    assert cl.metrics["fwd_passes"] == ref.metrics["fwd_passes"]


def _boom(*a, **k):
    raise RuntimeError("no compiler for this backend")


def test_compile_failure_falls_back_to_eager_with_a_warning(tmp_path, digits_splits,
                                                            monkeypatch, caplog):
    ref = fit(cfg(regime="rl"), tmp_path / "ref", splits=digits_splits)

    def failing_compile(self, *a, **k):
        self._compiled_call_impl = _boom

    monkeypatch.setattr(torch.nn.Module, "compile", failing_compile)
    with caplog.at_level(logging.WARNING, logger="aerl_ray.fastpath"):
        res = fit(cfg(regime="rl", compile=True), tmp_path / "c", splits=digits_splits)
    assert "torch.compile failed" in caplog.text and "training runs eager" in caplog.text
    # the trial forward+backward left no trace: the run equals the uncompiled one
    assert res.metrics["train_loss"] == ref.metrics["train_loss"]
    assert res.metrics["mean_reward"] == ref.metrics["mean_reward"]
    assert res.metrics["val_acc"] == ref.metrics["val_acc"]


@pytest.mark.slow
def test_compile_trains_tiny_one_epoch(tmp_path, digits_splits, caplog):
    ref = fit(cfg(), tmp_path / "ref", splits=digits_splits)
    with caplog.at_level(logging.INFO, logger="aerl_ray.fastpath"):
        res = fit(cfg(compile=True), tmp_path / "c", splits=digits_splits)
    assert "runs compiled" in caplog.text, caplog.text
    m, r = res.metrics, ref.metrics
    assert (m["fwd_passes"], m["bwd_passes"]) == (r["fwd_passes"], r["bwd_passes"])
    assert m["train_loss"] == pytest.approx(r["train_loss"], rel=1e-3)
    assert abs(m["val_acc"] - r["val_acc"]) <= 0.02
    assert list(res.model.state_dict()) == list(ref.model.state_dict())


def test_device_generator_sampling_is_reproducible_and_stays_on_its_device():
    cpu = torch.Generator().manual_seed(1)
    assert fastpath.device_generator(cpu, torch.device("cpu"), 5) is cpu
    logits = torch.randn(64, 10)
    draws = []
    for _ in range(2):
        g = torch.Generator().manual_seed(7)
        ctx = RegimeContext(cfg=None, num_classes=10, device_generator=g)
        assert ctx.rng is g
        a, e = sample_actions(logits, 0.3, "per_sample", ctx.rng)
        draws.append((a, e))
        assert a.device == logits.device
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    other = sample_actions(logits, 0.3, "per_sample", torch.Generator().manual_seed(8))[0]
    assert not torch.equal(other, draws[0][0])
    assert RegimeContext(cfg=None, num_classes=10).rng is not None  # falls back to generator


def test_rng_capture_restores_a_distinct_device_generator(caplog):
    gen, dgen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    state = rng.capture(gen, torch.device("cpu"), dgen)
    first = torch.rand(5, generator=dgen)
    rng.restore(state, gen, torch.device("cpu"), dgen)
    assert torch.equal(torch.rand(5, generator=dgen), first)
    assert "device_generator" not in rng.capture(gen, None, gen)  # the CPU case: one object
    state.pop("device_generator")
    with caplog.at_level(logging.WARNING, logger="aerl_ray.rng"):
        rng.restore(state, gen, torch.device("cpu"), dgen)
    assert "no device-generator state" in caplog.text


def test_epoch_sums_equal_the_host_float_sums():
    g = torch.Generator().manual_seed(0)
    sums, host = fastpath.EpochSums(torch.device("cpu")), [0.0, 0.0, 0]
    for n in (64, 64, 17):
        loss = torch.rand((), generator=g) * 3
        logits, y = torch.randn(n, 10, generator=g), torch.randint(0, 10, (n,), generator=g)
        reward = torch.rand(n, generator=g).mean()
        sums.add(loss, {"logits": logits, "reward": reward}, y)
        host[0] += float(loss) * n
        host[1] += float(reward) * n
        host[2] += int((logits.argmax(1) == y).sum())
    out = sums.read()
    assert (out["loss"], out["reward"], out["correct"]) == tuple(host)  # bit-identical
    assert out["n"] == out["clean_n"] == out["reward_n"] == 145 and out["adv_n"] == 0
    sums.add(torch.tensor(float("nan")), {}, torch.zeros(3, dtype=torch.long))
    assert not sums.loss_finite()


def test_bench_gpu_smoke_runs_on_cpu_without_ray_or_optuna():
    code = ("import sys, runpy; sys.modules['ray'] = None; sys.modules['optuna'] = None; "
            "sys.argv = ['bench/gpu.py', '--smoke', '--device', 'cpu']; "
            "runpy.run_path('bench/gpu.py', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for row in ("train SL img/s, tiny", "train SL img/s, cnn4", "RL step / SL step",
                "PGD-5 img/s", "AutoAttack", "imports: torch + aerl_ray only"):
        assert row in out.stdout, out.stdout
    assert time.perf_counter() - t < 120, out.stdout
