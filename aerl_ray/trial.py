"""One sweep trial: a Tune function trainable that is also the Ray Train driver.

Three layers (Ray 2.60, Train V2): the Tuner runs :func:`trial_fn` once per ledger ticket
(:class:`aerl_ray.ledger.Ticket`: a search trial or a confirmation run); for multi-worker
trials it builds a ``TorchTrainer`` whose workers run :func:`worker_fn` (DDP via
``prepare_model``); a 1-worker trial runs the same :func:`~aerl_ray.train.train_loop`
in-process (``mode: in_process``), which saves the TorchTrainer start-up (see
``bench/sweep_overhead.py``).  After training the trial hands its *selected* checkpoint to
the shared evaluator pool (the search plan on validation; a confirmation run: the
confirmation plan on test) and reports the row the driver commits.

Every epoch is reported with a checkpoint (``last.pt`` to resume from, plus the selected
``best.pt``); the driver records where it is, so a trial re-run after a driver crash starts
from it.  Per-epoch reports carry the objective keys as NaN, so nothing reads an
unfinished trial as finished.
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
from aerl_ray.ledger import CONFIRM, SEARCH, Ticket
from aerl_ray.results import config_hash
from aerl_ray.stats import wilson_of
from aerl_ray.train import DivergedError, WorkerContext, resolve_device, train_loop

logger = logging.getLogger(__name__)

FINAL_KEY = "aerl_final"  # set (=1) only in a trial's final, evaluated report
ERROR_KEY = "aerl_error"  # the reason, in the final report of a trial that diverged
ROW_KEY = "aerl_row_json"  # the trial's results row (committed by the driver)


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


def _resume_checkpoint(ticket: Ticket):
    """Tune's own checkpoint (a retry within this attempt), else the one the driver
    recorded before it died (``ticket.resume_from``), else None."""
    from ray import tune

    ck = tune.get_checkpoint()
    if ck is None and ticket.resume_from:
        ck = tune.Checkpoint(ticket.resume_from)
        logger.info("trial %s resumes from %s (epoch %d)", ticket.key, ticket.resume_from,
                    ticket.resume_epoch)
    return ck


def worker_fn(config: dict) -> None:
    """Ray Train per-worker function (runs on every rank; DDP when world size > 1)."""
    import ray.train
    import ray.train.torch

    from aerl_ray.plugins import load_in_worker

    load_in_worker(config.get("plugins", []))
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
                                           on_epoch=on_epoch, resume=resume,
                                           final_test=False, robust_epochs=frozenset(
                                               config.get("robust_epochs", ()))))
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


def _train_in_process(cfg: TrainConfig, names: list[str], ticket: Ticket,
                      robust_epochs=()) -> dict:
    from ray import tune

    out = Path(tempfile.mkdtemp(prefix="aerl-trial-"))
    resume = _restore_into(_resume_checkpoint(ticket), out)

    def on_epoch(m: dict, out_dir: Path) -> None:
        snap = _snapshot(out_dir)
        tune.report(epoch_metrics(m, names), checkpoint=tune.Checkpoint.from_directory(str(snap)))
        shutil.rmtree(snap, ignore_errors=True)

    try:
        res = train_loop(cfg, out, WorkerContext(device=resolve_device(cfg.device),
                                                 on_epoch=on_epoch, resume=resume,
                                                 final_test=False,
                                                 robust_epochs=frozenset(robust_epochs)))
        best = load_checkpoint(out / "best.pt")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"best": best, "final": res.metrics}


def _train_with_torchtrainer(cfg: TrainConfig, names: list[str], meta: dict, ticket: Ticket
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
                           "scheduler_metric": meta.get("scheduler_metric"),
                           "robust_epochs": list(meta.get("robust_epochs", ())),
                           "plugins": meta.get("plugins", [])},
        scaling_config=ray.train.ScalingConfig(num_workers=int(res.get("workers", 1)),
                                               use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            # stable per trial (the ledger's id, not Tune's): a re-run resumes from it
            name=f"train-{ticket.key}",
            storage_path=meta["train_storage"],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=int(meta.get("max_failures", 2))),
            callbacks=[TuneReportCallback()]))
    result = trainer.fit()
    if (result.metrics or {}).get(ERROR_KEY):
        raise DivergedError(result.metrics[ERROR_KEY], int(result.metrics["diverged_epoch"]))
    if result.checkpoint is None:
        raise RuntimeError(f"trial {ticket.key}: Ray Train returned no checkpoint")
    with result.checkpoint.as_directory() as d:
        best = load_checkpoint(Path(d) / "best.pt")
        last = load_checkpoint(Path(d) / "last.pt")
    return {"best": best, "final": dict(last.get("metrics") or {}),
            "checkpoint_path": result.checkpoint.path}


def trial_config(meta: dict, ticket: Ticket) -> TrainConfig:
    """The resolved training config of a ticket (fixed values, its parameters, its seed)."""
    flat = {**meta["fixed"], **dict(ticket.params), "seed": ticket.seed}
    if not meta["resources"].get("use_gpu"):
        flat["device"] = "cpu"
    return TrainConfig.from_flat(flat)


def trial_fn(config: dict) -> None:
    """The Tune trainable: train (in-process or TorchTrainer), evaluate, report the row."""
    from ray import tune

    from aerl_ray.plugins import load_in_worker

    meta = config["_aerl"]
    load_in_worker(meta.get("plugins", []))  # before the config names their regimes/models
    ticket = Ticket.of(config)
    cfg = trial_config(meta, ticket)
    names = [o["name"] for o in meta["objectives"]]
    t_start = time.perf_counter()
    try:
        if meta["mode"] == "in_process":
            trained = _train_in_process(cfg, names, ticket, meta.get("robust_epochs", ()))
        else:
            trained = _train_with_torchtrainer(cfg, names, meta, ticket)
    except DivergedError as e:  # final, not retried: the same config diverges again
        logger.warning("trial %s diverged: %s", ticket.key, e)
        tune.report(diverged_report(str(e), e.epoch, meta, cfg, ticket,
                                    time.perf_counter() - t_start))
        return
    best, final = trained["best"], trained["final"]

    t1 = time.perf_counter()
    dispatcher = ray.get_actor(meta["dispatcher"], namespace=meta["namespace"])
    evaluation = ray.get(dispatcher.evaluate.remote(
        [ray.put(best)], {"run_id": meta["run_id"], "trial_id": ticket.key,
                          "checkpoint": f"{ticket.key}/best.pt", "phase": ticket.phase}))
    eval_seconds = time.perf_counter() - t1
    report = final_report(evaluation, meta, best, final, cfg, ticket)
    row = json.loads(report[ROW_KEY])
    row.update(eval_seconds=eval_seconds, trial_seconds=time.perf_counter() - t_start,
               eval_compute_seconds=float(evaluation.get("seconds", eval_seconds)),
               checkpoint=str(trained.get("checkpoint_path") or ""))  # the driver knows Tune's
    report[ROW_KEY] = json.dumps(row, default=str)
    tune.report(report)


def _code_hash() -> str:
    from aerl_ray.plugins import code_hash

    return code_hash()


def base_row(meta: dict, cfg: TrainConfig, ticket: Ticket) -> dict[str, Any]:
    """The columns a trial row (search or confirmation) has whatever happened."""
    flat = cfg.to_flat()
    row = {"run_id": meta["run_id"], "trial_id": ticket.key, "regime": cfg.regime.regime,
           "train_seed": ticket.seed, "params": json.dumps(dict(ticket.params), sort_keys=True,
                                                           default=str),
           "config": json.dumps(flat, sort_keys=True), "config_hash": config_hash(flat),
           "code_hash": _code_hash(),
           "finished_at": time.time(),
           **{f"p_{k}": v for k, v in ticket.params.items()}}
    if ticket.phase == SEARCH:
        row.update(number=ticket.number, split="val")
    else:
        row.update(config_id=ticket.config_id, seed_index=ticket.seed_index, why=ticket.why,
                   split="test")
    return row


def diverged_report(reason: str, epochs: int, meta: dict, cfg: TrainConfig, ticket: Ticket,
                    seconds: float) -> dict[str, Any]:
    """The final report of a diverged trial: NaN objectives and its FAILED row."""
    out: dict[str, Any] = {o["name"]: float("nan") for o in meta["objectives"]}
    if meta.get("scheduler_metric"):  # Tune checks the scheduler's metric in every result
        out[meta["scheduler_metric"]] = float("nan")
    row = {**base_row(meta, cfg, ticket), "status": "FAILED", "error": reason[:500],
           "epochs_run": max(0, epochs), "train_seconds": seconds, "trial_seconds": seconds,
           **{f"obj_{o['name']}": float("nan") for o in meta["objectives"]}}
    out.update({FINAL_KEY: 1, ERROR_KEY: reason, ROW_KEY: json.dumps(row, default=str),
                "eval_rows_json": "[]", "indicator_rows_json": "[]"})
    return out


def _finite(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f


def objective_value(o: dict, rows: list[dict]) -> tuple[float, int]:
    """(value, n) of one objective from an evaluation's rows: ``clean_acc`` is the clean
    accuracy on the evaluation's images; a robust objective the matching row's accuracy.
    NaN (the trial then counts as PRUNED, never COMPLETE) when the row is missing."""
    if not rows:
        return float("nan"), 0
    if o.get("attack") is None:
        return float(rows[0]["clean_acc"]), int(rows[0]["n"])
    from aerl_ray.attacks.threat import Norm, parse_eps

    eps = parse_eps(o["eps"])
    norm = Norm.parse(o["norm"]).value
    for r in rows:
        if ((r["attack"] == o["attack"] or r["attack"].split(":")[0] == o["attack"])
                and r["norm"] == norm
                and math.isclose(float(r["eps"]), eps, rel_tol=1e-6, abs_tol=1e-9)):
            return float(r["robust_acc"]), int(r["n"])
    return float("nan"), 0


def final_report(evaluation: dict, meta: dict, best: dict, final: dict, cfg: TrainConfig,
                 ticket: Ticket) -> dict[str, Any]:
    """The final Tune report: objective values (for Tune's own logs) and the trial's row,
    evaluation and indicator rows (JSON) for the driver to commit."""
    rows, ind = evaluation["rows"], evaluation["indicators"]
    sel = dict(best.get("selection") or {})
    row = {**base_row(meta, cfg, ticket), "status": "COMPLETE", "error": "",
           "epochs_run": int(final.get("epoch", best["epoch"])) + 1,
           "ckpt_epoch": int(best["epoch"]),
           "ckpt_regime": str(best["metrics"].get("regime_active", "")),
           "ckpt_reason": str(sel.get("reason", "")),
           "val_acc": float(best["metrics"].get("val_acc", float("nan"))),
           "val_robust_acc": best["metrics"].get("val_robust_acc"),
           "clean_acc": float(rows[0]["clean_acc"]) if rows else float("nan"),
           "train_fwd_passes": int(final.get("fwd_passes", 0)),
           "train_bwd_passes": int(final.get("bwd_passes", 0)),
           "select_fwd_passes": int(final.get("select_fwd_passes", 0)),
           "select_bwd_passes": int(final.get("select_bwd_passes", 0)),
           "train_seconds": float(final.get("wall_seconds", float("nan"))),
           "eval_fwd_passes": sum(int(r["fwd_passes"]) for r in rows),
           "eval_bwd_passes": sum(int(r["bwd_passes"]) for r in rows),
           "masking_suspected": bool(evaluation.get("masking_suspected", False)),
           "diagnostics": json.dumps(evaluation.get("diagnostics", {}), default=str),
           "diagnostics_level": evaluation.get("diagnostics_level", "")}
    out: dict[str, Any] = {}
    for o in meta["objectives"]:
        v, n = objective_value(o, rows)
        lo, hi = wilson_of(v, n)
        row.update({f"obj_{o['name']}": v, f"obj_{o['name']}_low": lo,
                    f"obj_{o['name']}_high": hi, f"obj_{o['name']}_n": n})
        out[o["name"]] = v
    if ticket.phase == SEARCH and not all(math.isfinite(out[o["name"]])
                                          for o in meta["objectives"]):
        row.update(status="PRUNED", error="an objective is NaN (not evaluated)")
    if meta.get("scheduler_metric"):  # Tune checks the scheduler's metric in every result
        out[meta["scheduler_metric"]] = _finite(best["metrics"].get(meta["scheduler_metric"]))
    out.update({FINAL_KEY: 1, ROW_KEY: json.dumps(row, default=str),
                "eval_rows_json": json.dumps(rows, default=str),
                "indicator_rows_json": json.dumps(ind, default=str)})
    # numeric copies for TensorBoard (eval/<split>/<attack>/<norm>/<eps>)
    for r in rows:
        out[f"eval/{r['split']}/{r['attack']}/{r['norm']}/{r['eps_str']}"] = float(
            r["robust_acc"])
    return out


__all__ = ["trial_fn", "worker_fn", "final_report", "objective_value", "FINAL_KEY",
           "ERROR_KEY", "ROW_KEY", "CONFIRM"]
