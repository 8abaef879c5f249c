"""The sweep: Ray Tune + Optuna over Ray Train trials with a shared evaluator pool.

``python -m aerl_ray.sweep`` (no arguments) runs ``search_spaces/quickstart.yaml`` on a
local Ray with the embedded digits dataset.  On a cluster::

    python -m aerl_ray.sweep --space search_spaces/paper_cifar10.yaml --address auto \
        --storage s3://bucket/aerl --optuna-storage postgresql://user@head/aerl

``--resume RUN_DIR`` continues a killed sweep (``Tuner.restore``).  Everything lands in
the run dir (layout: :mod:`aerl_ray.results`).  Order of work: validate the space and all
options, connect Ray, open the Optuna storage, train the transfer reference, start the
evaluator pool, then run trials -- so bad input fails before any trial starts.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from aerl_ray import results as R
from aerl_ray.recorder import final_diagnostics, pareto_front, results_callback
from aerl_ray.search import (StorageConnectError, close_stale_trials, make_sampler,
                             open_storage, searcher_class)
from aerl_ray.space import SpaceError, SweepSpec, load_space, parse_space

logger = logging.getLogger(__name__)

DEFAULT_SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "quickstart.yaml"
NAMESPACE = "aerl"


class SweepError(RuntimeError):
    """A sweep cannot start or resume; the message says why and what to do."""


@dataclass
class SweepResult:
    run_dir: Path
    trials: pd.DataFrame
    pareto: pd.DataFrame
    objectives: list[dict]
    fit_seconds: float = float("nan")  # wall time of Tuner.fit (the trials themselves)
    concurrency: int = 1


# ---------------------------------------------------------------------------------------
# the driver
def _connect(address: str | None, num_cpus: int | None):
    import ray

    if address and address not in ("auto", "local"):
        _check_reachable(address)
    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        else:
            ray.init(address="local", namespace=NAMESPACE, include_dashboard=True,
                     num_cpus=num_cpus, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SweepError(f"cannot connect to the Ray cluster at {address!r} ({e}). Start it "
                         "(`ray start --head` or `ray up cluster.yaml`), use --address auto on "
                         "a cluster node, and export RAY_AUTH_MODE=token (plus RAY_AUTH_TOKEN) "
                         "when connecting to a token-authenticated cluster by address.") from e


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds (not after Ray's long connection retries) on a dead host:port."""
    import socket
    from urllib.parse import urlparse

    hostport = urlparse(address if "://" in address else f"ray://{address}")
    host, port = hostport.hostname, hostport.port or 6379
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise SweepError(f"cannot reach the Ray cluster at {address!r} ({e}); check the "
                         "address (head node IP and GCS port, default 6379), that `ray start "
                         "--head` runs there, or use --address auto on a cluster node") from e


def _plan_resources(spec: SweepSpec, cluster: dict[str, float],
                    gpus_per_node: float | None = None) -> dict:
    """Trial resources, training mode, GPU use and concurrency for this cluster."""
    from aerl_ray.cluster import check_gpu_request, resolve_use_gpu

    res = dict(spec.resources)
    workers = int(res.get("workers", 1))
    cpw = float(res.get("cpus_per_worker", 1))
    gpus = float(cluster.get("GPU", 0))
    use_gpu = resolve_use_gpu(res.get("use_gpu", "auto"), cluster)
    ev = spec.evaluation
    check_gpu_request(float(res.get("gpus_per_worker", 1)) if use_gpu else 0,
                      float(ev.get("gpus_per_actor", 0)) if use_gpu else 0, cluster,
                      gpus_per_node=gpus_per_node)
    mode = res.get("mode", "auto")
    if mode == "auto":
        mode = "in_process" if workers == 1 else "ray_train"
    if mode == "in_process" and workers != 1:
        raise SweepError("resources.mode in_process needs workers: 1")
    eval_cpus = float(ev.get("cpus_per_actor", 0.5)) * int(ev.get("actors", 1))
    free = max(0.0, float(cluster.get("CPU", 1)) - eval_cpus)
    conc = max(1, int(free // (workers * cpw)))
    if use_gpu:
        gpw = float(res.get("gpus_per_worker", 1))
        eval_gpus = float(ev.get("gpus_per_actor", 0)) * int(ev.get("actors", 1))
        conc = max(1, min(conc, int((gpus - eval_gpus) // (workers * gpw))))
    if spec.max_concurrent:
        conc = min(conc, spec.max_concurrent)
    if mode == "in_process":
        trial_res = {"cpu": cpw, **({"gpu": float(res.get("gpus_per_worker", 1))} if use_gpu else {})}
    else:  # the trial only drives a TorchTrainer: a tiny share avoids the 2-CPU deadlock
        trial_res = {"cpu": 0.01}
        if res.get("driver_resource"):
            trial_res = {"cpu": 0.01, res["driver_resource"]: 0.01}
    return {**res, "use_gpu": bool(use_gpu), "mode": mode, "concurrency": conc,
            "trial_resources": trial_res}


def _train_reference(spec: SweepSpec, run: R.RunDir, plan_res: dict) -> dict | None:
    """Train (once; reused on resume) the SL reference model used by transfer attacks."""
    import ray

    from aerl_ray.checkpoint import load_checkpoint

    ref = dict(spec.reference)
    if not ref:
        return None
    if ref.get("checkpoint"):
        return load_checkpoint(ref["checkpoint"])
    path = run.root / "reference" / "best.pt"
    if path.exists():
        return load_checkpoint(path)
    cfg = spec.train_config({k: v for k, v in ref.items() if k != "checkpoint"}, seed=spec.seed)
    if not plan_res["use_gpu"]:
        cfg = cfg.replace(device="cpu")

    @ray.remote
    def train_ref(flat: dict, out: str) -> None:
        from aerl_ray.config import TrainConfig
        from aerl_ray.train import fit

        fit(TrainConfig.from_flat(flat), out)

    opts = {"num_cpus": float(plan_res.get("cpus_per_worker", 1))}
    if plan_res["use_gpu"]:
        opts["num_gpus"] = float(plan_res.get("gpus_per_worker", 1))
    logger.info("training the transfer reference (%s %s, %d epochs)", cfg.regime.regime,
                cfg.model.model, cfg.epochs)
    ray.get(train_ref.options(**opts).remote(cfg.to_flat(), str(path.parent)))
    return load_checkpoint(path)


def run_sweep(space: str | Path | None = None, run_dir: str | Path | None = None, *,
              address: str | None = None, storage: str | None = None,
              optuna_storage: str | None = None, resume: str | Path | None = None,
              smoke: bool = False, num_samples: int | None = None,
              overrides: dict | None = None, num_cpus: int | None = None,
              verbose: int = 1) -> SweepResult:
    """Run (or resume) a sweep and return its trial table and Pareto set.

    ``overrides`` is deep-merged into the space file (after ``smoke``), e.g.
    ``{"fixed": {"dataset": "npz:/data/mine.npz"}}``."""
    import ray
    from ray import tune

    # -- validate everything before Ray starts ------------------------------------------
    if resume is not None:
        run = R.RunDir(resume)
        if not run.is_run_dir():
            raise SweepError(f"{run.root} is not a sweep run dir (no sweep.json); give the "
                             "directory a previous `python -m aerl_ray.sweep` printed")
        saved = json.loads(run.spec.read_text())
        if space is not None and Path(space).resolve() != Path(saved["space_file"]).resolve():
            raise SweepError(f"{run.root} belongs to another sweep (space "
                             f"{saved['space_file']}, not {space}); resume without --space or "
                             "start a new run dir")
        spec = parse_space(saved["space"], saved["space_file"])
        run_id, study_name = saved["run_id"], saved["study_name"]
        optuna_url, storage = saved["optuna_storage"], saved.get("storage") or storage
        if not (run.tune / spec.name).exists() and not saved.get("storage"):
            raise SweepError(f"{run.root} has no Tune experiment to restore (tune/{spec.name})")
    else:
        space = Path(space or DEFAULT_SPACE)
        extra = dict(overrides or {})
        if num_samples:
            extra["num_samples"] = num_samples
        spec = load_space(space, smoke=smoke, overrides=extra or None)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run = R.RunDir(run_dir or Path("runs") / f"{spec.name}-{stamp}")
        if run.is_run_dir():
            raise SweepError(f"{run.root} already holds a sweep; use --resume {run.root} to "
                             "continue it or choose another --run-dir")
        run.root.mkdir(parents=True, exist_ok=True)
        run_id = f"{spec.name}-{stamp}-{uuid.uuid4().hex[:6]}"
        study_name = run_id
        optuna_url = optuna_storage or f"sqlite:///{run.optuna_db}"
    try:
        optuna_rdb = open_storage(optuna_url)
    except StorageConnectError as e:
        raise SweepError(str(e)) from e

    _connect(address, num_cpus)
    from aerl_ray.cluster import GpuRequestError, StorageError, check_storage, cluster_nodes_summary

    summary = cluster_nodes_summary()
    try:
        storage = check_storage(storage, summary.nodes_possible)
        plan_res = _plan_resources(spec, summary.reachable, summary.max_gpus_per_node or None)
    except (StorageError, GpuRequestError) as e:
        raise SweepError(str(e)) from e
    tune_storage = storage or str(run.tune)
    if resume is None:
        run.spec.write_text(json.dumps({
            "run_id": run_id, "study_name": study_name, "optuna_storage": optuna_url,
            "storage": storage, "space_file": str(Path(spec.source).resolve()),
            "space": spec.raw, "smoke": smoke,
            "objectives": [o.__dict__ for o in spec.objectives], "created_at": time.time(),
            "command": " ".join(sys.argv)}, indent=1, default=str))
    for table in (run.trials, run.evals, run.indicators):
        for p in R.repair_table(table):
            logger.warning("repaired %s", p)

    # -- the evaluator pool and the transfer reference ------------------------------------
    reference = _train_reference(spec, run, plan_res)
    ev = spec.evaluation
    from aerl_ray.evalpool import start_pool

    dispatcher_name = f"eval-{run_id}"
    pool = start_pool(dispatcher_name, NAMESPACE, int(ev.get("actors", 1)), dict(ev), reference,
               spec.seed, float(ev.get("cpus_per_actor", 0.5)),
               float(ev.get("gpus_per_actor", 0)) if plan_res["use_gpu"] else 0.0)

    # -- Tune + Optuna ----------------------------------------------------------------
    objectives = [o.__dict__ for o in spec.objectives]
    meta = {"run_id": run_id, "fixed": dict(spec.fixed), "objectives": objectives,
            "resources": plan_res, "mode": plan_res["mode"], "base_seed": spec.seed,
            "scheduler_metric": spec.scheduler.get("metric"),
            "dispatcher": dispatcher_name, "namespace": NAMESPACE,
            "train_storage": os.path.join(tune_storage, spec.name + "-train")
            if "://" not in tune_storage else tune_storage.rstrip("/") + f"/{spec.name}-train"}
    from aerl_ray.trial import trial_fn

    trainable = tune.with_resources(trial_fn, plan_res["trial_resources"])
    searcher = None  # a resume restores the pickled searcher; building one would enqueue
    if resume is None:  # points_to_evaluate into the study again (stray WAITING trials)
        searcher = searcher_class()(
            space=spec.define_by_run, metric=[o.name for o in spec.objectives],
            mode=[o.direction for o in spec.objectives], sampler=make_sampler(spec),
            points_to_evaluate=[dict(p) for p in spec.points_to_evaluate] or None,
            study_name=study_name, storage=optuna_rdb)
    scheduler = None
    if spec.scheduler.get("type") == "asha":
        from ray.tune.schedulers import ASHAScheduler

        s = spec.scheduler
        scheduler = ASHAScheduler(metric=s["metric"], mode=s.get("mode", "max"),
                                  time_attr="training_iteration",
                                  grace_period=int(s.get("grace_period", 1)),
                                  reduction_factor=float(s.get("reduction_factor", 2)),
                                  max_t=int(spec.fixed.get("epochs", 1000)) + 1)
    callbacks = [results_callback(run, run_id, spec)]
    run_config = tune.RunConfig(name=spec.name, storage_path=tune_storage, callbacks=callbacks,
                                verbose=verbose,
                                failure_config=tune.FailureConfig(max_failures=1))
    param_space = {"_aerl": meta}
    if resume is not None:
        exp = f"{tune_storage.rstrip('/')}/{spec.name}"
        tuner = tune.Tuner.restore(exp, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False,
                                   param_space=param_space)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space, run_config=run_config,
                           tune_config=tune.TuneConfig(
                               search_alg=searcher, scheduler=scheduler,
                               num_samples=spec.num_samples,
                               trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
                               # a new trial reuses a finished trial's process: no
                               # re-import of torch/Ray per trial (seconds each)
                               reuse_actors=True,
                               max_concurrent_trials=plan_res["concurrency"]))
    logger.info("sweep %s: %d trials, %d concurrent (%s mode), run dir %s", run_id,
                spec.num_samples, plan_res["concurrency"], plan_res["mode"], run.root)
    t_fit = time.perf_counter()
    try:
        tuner.fit()
        fit_seconds = time.perf_counter() - t_fit
        level = ev.get("final_diagnostics", "full")
        trials = R.read_table(run.trials, key=R.TRIAL_KEY)
        front = pareto_front(trials, [o.__dict__ for o in spec.objectives])
        if level != "off" and not front.empty:
            todo = front[front.get("diagnostics_level", pd.Series("", index=front.index)) != level]
            logger.info("re-evaluating %d Pareto trials with %s diagnostics", len(todo), level)
            final_diagnostics(run, pool, todo, level, run_id)
    finally:
        ray.kill(pool)
    stale = close_stale_trials(optuna_url, study_name)
    if stale:
        logger.info("marked %d stale RUNNING study trials as FAIL", stale)
    trials = R.read_table(run.trials, key=R.TRIAL_KEY)
    return SweepResult(run.root, trials, pareto_front(trials, objectives), objectives,
                       fit_seconds, plan_res["concurrency"])


# ---------------------------------------------------------------------------------------
# CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aerl_ray.sweep",
        description="Multi-objective (clean vs robust accuracy) search over training regimes: "
                    "Ray Tune + Optuna trials that train with Ray Train and are evaluated by a "
                    "shared evaluator actor pool.")
    p.add_argument("--space", default=None,
                   help=f"search-space YAML (default: {DEFAULT_SPACE.relative_to(DEFAULT_SPACE.parent.parent)})")
    p.add_argument("--run-dir", default=None, help="output dir (default runs/<name>-<time>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a killed sweep")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (auto on a cluster node); default: a local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    p.add_argument("--storage", default=os.environ.get("AERL_STORAGE"),
                   help="Ray Train/Tune storage: shared path or URI (s3://...); required on "
                        "multi-node clusters; default: $AERL_STORAGE or the run dir")
    p.add_argument("--optuna-storage", default=os.environ.get("AERL_OPTUNA_STORAGE"),
                   help="SQLAlchemy URL of the Optuna study (default: $AERL_OPTUNA_STORAGE or "
                        "sqlite:///RUN/optuna.db)")
    p.add_argument("--num-samples", type=int, default=None, help="override num_samples")
    p.add_argument("--smoke", action="store_true",
                   help="apply the space's smoke: overrides (tiny runs, for tests)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report at the end")
    p.add_argument("--log-level", default="INFO")
    return p


def format_pareto(res: SweepResult) -> str:
    names = [o["name"] for o in res.objectives]
    cols = ["trial_id", "regime"] + [f"obj_{n}" for n in names] + ["masking_suspected"]
    cols += sorted(c for c in res.pareto.columns if c.startswith("p_") and c != "p_regime")
    if res.pareto.empty:
        return "(no completed trials)"
    return res.pareto[[c for c in cols if c in res.pareto.columns]].to_string(
        index=False, float_format=lambda v: f"{v:.4g}")


def main(argv: list[str] | None = None) -> int:
    from aerl_ray.cli import fail, setup_logging
    from aerl_ray.config import ConfigError

    parser = build_parser()
    ns = parser.parse_args(argv)
    setup_logging(ns.log_level)
    try:
        res = run_sweep(ns.space, ns.run_dir, address=ns.address, storage=ns.storage,
                        optuna_storage=ns.optuna_storage, resume=ns.resume, smoke=ns.smoke,
                        num_samples=ns.num_samples, num_cpus=ns.num_cpus)
    except (SweepError, SpaceError, ConfigError) as e:
        fail(parser, e)
    run = R.RunDir(res.run_dir)
    done = res.trials[res.trials["status"] == "COMPLETE"] if not res.trials.empty else res.trials
    print(f"\n{len(done)} of {len(res.trials)} trials completed.  Pareto set "
          f"({' vs '.join(o['name'] for o in res.objectives)}):")
    print(format_pareto(res))
    print(f"\nrun dir:      {run.root}\nresults:      {run.trials}  {run.evals}  {run.indicators}"
          f"\ntensorboard:  tensorboard --logdir {run.root}"
          f"\noptuna:       optuna-dashboard {json.loads(run.spec.read_text())['optuna_storage']}")
    if not ns.no_report:
        from analysis.report import write_report

        rep = write_report(run.root, command=" ".join(["python -m aerl_ray.sweep", *(argv or sys.argv[1:])]))
        print(f"\n{rep.markdown}\nreport:       {rep.paths['report.html']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
