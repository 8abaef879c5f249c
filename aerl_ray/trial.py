"""One sweep trial: a Tune function trainable that is also the Ray Train driver.

Three layers (Ray 2.60, Train V2): the Tuner runs :func:`trial_fn` once per config; for
multi-worker trials it builds a ``TorchTrainer`` whose workers run :func:`worker_fn`
(DDP via ``prepare_model``); a 1-worker trial runs the same :func:`~aerl_ray.train.train_loop`
in-process (``mode: in_process``), which saves the TorchTrainer start-up (see
``bench/sweep_overhead.py``).  After training the trial hands the best checkpoint to the
shared evaluator pool and reports its objectives once the evaluation returns.

Every per-epoch report carries the objective keys as NaN, so a trial stopped early (ASHA)
never enters the Optuna study as COMPLETE with early-epoch values (see
``sweep.ParetoSafeOptunaSearch``).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from aerl_ray.checkpoint import load_checkpoint
from aerl_ray.config import TrainConfig
from aerl_ray.train import DivergedError, WorkerContext, resolve_device, train_loop

logger = logging.getLogger(__name__)

FINAL_KEY = "aerl_final"  # set (=1) only in a trial's final, evaluated report
ERROR_KEY = "aerl_error"  # the reason, in the final report of a trial that diverged


def epoch_metrics(m: dict, objective_names: list[str]) -> dict:
    """A per-epoch report: numeric training metrics, objectives NaN, not final."""
    out = {k: (float("nan") if v is None else v) for k, v in m.items()}
    out.update({name: float("nan") for name in objective_names})
    out[FINAL_KEY] = 0
    return out


def _snapshot(out_dir: Path) -> Path:
    """Copy the files a checkpoint needs into a fresh directory (Ray persists it)."""
    snap = Path(tempfile.mkdtemp(prefix="aerl-ckpt-"))
    for name in ("best.pt", "last.pt", "metrics.jsonl"):
        if (out_dir / name).exists():
            shutil.copy2(out_dir / name, snap / name)
    return snap


def _restore_into(checkpoint, out_dir: Path) -> dict | None:
    """Copy a Ray checkpoint's files into ``out_dir``; return its last.pt (or None)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        for p in Path(d).iterdir():
            if p.is_file():
                shutil.copy2(p, out_dir / p.name)
    last = out_dir / "last.pt"
    return load_checkpoint(last) if last.exists() else None


def worker_fn(config: dict) -> None:
    """Ray Train per-worker function (runs on every rank; DDP when world size > 1)."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_flat(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out = Path(tempfile.mkdtemp(prefix=f"aerl-train-r{rank}-"))
    resume = _restore_into(ray.train.get_checkpoint(), out)
    names = config["objective_names"]

    def on_epoch(m: dict, out_dir: Path) -> None:
        snap = _snapshot(out_dir) if rank == 0 else None
        ck = ray.train.Checkpoint.from_directory(str(snap)) if snap else None
        ray.train.report(epoch_metrics(m, names), checkpoint=ck)  # a barrier: all ranks
        if snap:
            shutil.rmtree(snap, ignore_errors=True)

    device = ray.train.torch.get_device()
    try:
        train_loop(cfg, out, WorkerContext(rank=rank, world_size=world, device=device,
                                           wrap_model=ray.train.torch.prepare_model,
                                           on_epoch=on_epoch, resume=resume))
    except DivergedError as e:  # not a worker failure: Ray Train must not retry it
        # Result.metrics of trainer.fit() are those of the latest *checkpointed* report,
        # so rank 0 attaches a marker checkpoint to this one
        extra = {config["scheduler_metric"]: None} if config.get("scheduler_metric") else {}
        snap = Path(tempfile.mkdtemp(prefix="aerl-ckpt-")) if rank == 0 else None
        if snap:
            (snap / "diverged.json").write_text(json.dumps({"reason": str(e), "epoch": e.epoch}))
        ray.train.report({**epoch_metrics(extra, names), ERROR_KEY: str(e),
                          "diverged_epoch": e.epoch},
                         checkpoint=ray.train.Checkpoint.from_directory(str(snap)) if snap else None)
        if snap:
            shutil.rmtree(snap, ignore_errors=True)


def _train_in_process(cfg: TrainConfig, names: list[str]) -> dict:
    from ray import tune

    out = Path(tempfile.mkdtemp(prefix="aerl-trial-"))
    resume = _restore_into(tune.get_checkpoint(), out)

    def on_epoch(m: dict, out_dir: Path) -> None:
        snap = _snapshot(out_dir)
        tune.report(epoch_metrics(m, names), checkpoint=tune.Checkpoint.from_directory(str(snap)))
        shutil.rmtree(snap, ignore_errors=True)

    try:
        res = train_loop(cfg, out, WorkerContext(device=resolve_device(cfg.device),
                                                 on_epoch=on_epoch, resume=resume))
        best = load_checkpoint(out / "best.pt")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"best": best, "history": res.history}


def _train_with_torchtrainer(cfg: TrainConfig, names: list[str], meta: dict, trial_id: str
                             ) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = meta["resources"]
    use_gpu = bool(res.get("use_gpu"))
    per_worker = {"CPU": float(res.get("cpus_per_worker", 1))}
    if use_gpu:
        per_worker["GPU"] = float(res.get("gpus_per_worker", 1))
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config={"train": cfg.to_flat(), "objective_names": names,
                           "scheduler_metric": meta.get("scheduler_metric")},
        scaling_config=ray.train.ScalingConfig(num_workers=int(res.get("workers", 1)),
                                               use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",  # stable per trial => a restarted trial resumes
            storage_path=meta["train_storage"],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=int(meta.get("max_failures", 2))),
            callbacks=[TuneReportCallback()]))
    result = trainer.fit()
    if (result.metrics or {}).get(ERROR_KEY):
        raise DivergedError(result.metrics[ERROR_KEY], int(result.metrics["diverged_epoch"]))
    if result.checkpoint is None:
        raise RuntimeError(f"trial {trial_id}: Ray Train returned no checkpoint")
    with result.checkpoint.as_directory() as d:
        best = load_checkpoint(Path(d) / "best.pt")
        from aerl_ray.train import read_metrics
        history = read_metrics(Path(d) / "metrics.jsonl")
    return {"best": best, "history": history, "checkpoint_path": result.checkpoint.path}


def trial_fn(config: dict) -> None:
    """The Tune trainable: train (in-process or TorchTrainer), evaluate, report."""
    from ray import tune

    meta = config["_aerl"]
    params = {k: v for k, v in config.items() if not k.startswith("_")}
    trial_id = tune.get_context().get_trial_id()
    seed = int(params.pop("seed", meta["base_seed"] * 100003 + int(config.get("_number", 0))))
    flat = {**meta["fixed"], **params, "seed": seed}
    if not meta["resources"].get("use_gpu"):
        flat["device"] = "cpu"
    cfg = TrainConfig.from_flat(flat)
    names = [o["name"] for o in meta["objectives"]]
    t_start = t0 = time.perf_counter()
    try:
        if meta["mode"] == "in_process":
            trained = _train_in_process(cfg, names)
        else:
            trained = _train_with_torchtrainer(cfg, names, meta, trial_id)
    except DivergedError as e:  # final, not retried: the same config diverges again
        logger.warning("trial %s diverged: %s", trial_id, e)
        tune.report(diverged_report(str(e), e.epoch, meta, cfg, params, seed,
                                    time.perf_counter() - t_start))
        return
    train_seconds = time.perf_counter() - t0
    best, history = trained["best"], trained["history"]

    t1 = time.perf_counter()
    dispatcher = ray.get_actor(meta["dispatcher"], namespace=meta["namespace"])
    evaluation = ray.get(dispatcher.evaluate.remote(
        [ray.put(best)], {"run_id": meta["run_id"], "trial_id": trial_id,
                          "checkpoint": f"{trial_id}/best.pt"}))
    eval_seconds = time.perf_counter() - t1
    final = final_report(evaluation, meta["objectives"], best, history, cfg)
    if trained.get("checkpoint_path"):  # Ray Train's (in-process: the Tune trial checkpoint)
        final["checkpoint_path"] = str(trained["checkpoint_path"])
    final.update(train_seconds=train_seconds, eval_seconds=eval_seconds,
                 eval_compute_seconds=float(evaluation.get("seconds", eval_seconds)),
                 trial_seconds=time.perf_counter() - t_start,
                 config_json=json.dumps(cfg.to_flat(), sort_keys=True),
                 params_json=json.dumps({k: v for k, v in params.items()}, sort_keys=True,
                                        default=str),
                 trial_seed=seed)
    tune.report(final)


def diverged_report(reason: str, epochs: int, meta: dict, cfg: TrainConfig, params: dict,
                    seed: int, seconds: float) -> dict[str, Any]:
    """The final report of a diverged trial: NaN objectives and the reason (recorded FAILED
    by the sweep's results writer and searcher)."""
    out: dict[str, Any] = {o["name"]: float("nan") for o in meta["objectives"]}
    if meta.get("scheduler_metric"):  # Tune checks the scheduler's metric in every result
        out[meta["scheduler_metric"]] = float("nan")
    out.update({FINAL_KEY: 1, ERROR_KEY: reason, "val_acc": float("nan"),
                "epochs_run": max(0, epochs), "train_seconds": seconds, "trial_seconds": seconds,
                "config_json": json.dumps(cfg.to_flat(), sort_keys=True),
                "params_json": json.dumps(params, sort_keys=True, default=str),
                "trial_seed": seed, "regime": cfg.regime.regime})
    return out


def objective_value(o: dict, rows: list[dict], clean_acc: float, val_acc: float) -> float:
    if o.get("attack") is None:
        return clean_acc if o["name"] == "clean_acc" else val_acc
    from aerl_ray.attacks.threat import parse_eps

    eps = parse_eps(o["eps"])
    norm = str(o["norm"]).lower()
    for r in rows:
        if ((r["attack"] == o["attack"] or r["attack"].split(":")[0] == o["attack"]) and str(r["norm"]).lower() == norm
                and math.isclose(float(r["eps"]), eps, rel_tol=1e-6, abs_tol=1e-9)):
            return float(r["robust_acc"])
    return float("nan")  # -> the searcher records the trial as PRUNED, not COMPLETE


def final_report(evaluation: dict, objectives: list[dict], best: dict, history: list[dict],
                 cfg: TrainConfig) -> dict[str, Any]:
    rows, ind = evaluation["rows"], evaluation["indicators"]
    clean = float(rows[0]["clean_acc"]) if rows else float("nan")
    last = history[-1] if history else {}
    val = float(best["metrics"].get("val_acc", float("nan")))
    out: dict[str, Any] = {o["name"]: objective_value(o, rows, clean, val) for o in objectives}
    out.update({
        FINAL_KEY: 1, "clean_acc": clean, "val_acc": val, "epochs_run": len(history),
        "best_epoch": int(best["epoch"]),
        "train_fwd_passes": int(last.get("fwd_passes", 0)),
        "train_bwd_passes": int(last.get("bwd_passes", 0)),
        "masking_suspected": bool(evaluation.get("masking_suspected", False)),
        "diagnostics_json": json.dumps(evaluation.get("diagnostics", {}), default=str),
        "diagnostics_level": evaluation.get("diagnostics_level", ""),
        "eval_rows_json": json.dumps(rows, default=str),
        "indicator_rows_json": json.dumps(ind, default=str),
        "regime": cfg.regime.regime,
    })
    # numeric copies for TensorBoard (eval/<attack>/<norm>/<eps>)
    for r in rows:
        out[f"eval/{r['attack']}/{r['norm']}/{r['eps_str']}"] = float(r["robust_acc"])
    return out

