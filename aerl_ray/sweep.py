"""The sweep: Ray Tune + Optuna over Ray Train trials with a shared evaluator pool.

``python -m aerl_ray.sweep`` (no arguments) runs ``search_spaces/quickstart.yaml`` on a
local Ray with the embedded digits dataset.  On a cluster::

    python -m aerl_ray.sweep --space search_spaces/paper_cifar10.yaml --address auto \
        --storage s3://bucket/aerl --optuna-storage postgresql://user@head/aerl

Two phases, both through the same trial function and evaluator pool:

1. **search** -- trials asked from the Optuna study, trained, evaluated on the
   *validation* split; their objectives (with 95% intervals) drive the search;
2. **confirm** -- the front's configurations (and the best of each regime) retrained with
   new seeds and evaluated on the untouched *test* split (:mod:`aerl_ray.confirm`).

Order of work: validate the space, every flag and the data (:mod:`aerl_ray.preflight`),
connect Ray, then create the run dir -- so bad input fails in seconds and leaves nothing
behind.  ``--resume RUN_DIR`` reconciles the study and the tables first
(:meth:`aerl_ray.ledger.Ledger.reconcile`), then continues where the sweep stopped.
Ctrl-C / SIGTERM: running trials finish their epoch (checkpointed), nothing new starts,
the driver prints how to resume and exits 130; a second Ctrl-C stops at once.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from aerl_ray import results as R
from aerl_ray.front import search_front
from aerl_ray.ledger import CONFIRM, SEARCH, Ledger
from aerl_ray.preflight import (PreflightError, check_auto_address, check_data,
                                check_storage_writable, resume_flags)
from aerl_ray.search import StorageConnectError, open_storage, searcher_class
from aerl_ray.space import SpaceError, SweepSpec, load_space, parse_space

logger = logging.getLogger(__name__)

DEFAULT_SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "quickstart.yaml"
NAMESPACE = "aerl"


class SweepError(RuntimeError):
    """A sweep cannot start or resume; the message says why and what to do."""


class SweepInterrupted(Exception):
    """Ctrl-C / SIGTERM: the sweep stopped; ``run_dir`` can be resumed."""

    def __init__(self, run_dir: Path | None, how: str = "interrupted"):
        super().__init__(how)
        self.run_dir = run_dir


@dataclass
class SweepResult:
    run_dir: Path
    trials: pd.DataFrame
    pareto: pd.DataFrame  # the search front (search_front: on_front + noise statuses)
    objectives: list[dict]
    fit_seconds: float = float("nan")  # wall time of the search's Tuner.fit
    concurrency: int = 1
    confirmed: pd.DataFrame = field(default_factory=pd.DataFrame)
    paths: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Ray
def _connect(address: str | None, num_cpus: int | None, runtime_env: dict | None = None
             ) -> None:
    import ray

    if address and address not in ("auto", "local"):
        _check_reachable(address)
    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False,
                     runtime_env=runtime_env or None)
        else:
            ray.init(address="local", namespace=NAMESPACE, include_dashboard=True,
                     num_cpus=num_cpus, log_to_driver=False, runtime_env=runtime_env or None)
    except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, timeouts, ...
        raise SweepError(f"cannot connect to the Ray cluster at {address or 'a new local Ray'!r} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})."
                         " Start it (`ray start --head` or `ray up cluster.yaml`), use --address "
                         "auto on a cluster node, and export RAY_AUTH_MODE=token (plus "
                         "RAY_AUTH_TOKEN) when connecting to a token-authenticated cluster by "
                         "address.") from e
    if address:
        ctx = ray.get_runtime_context()
        res = ray.cluster_resources()
        logger.info("attached to the Ray cluster at %s (%d nodes, %g CPUs, %g GPUs, node %s)",
                    address, len([n for n in ray.nodes() if n.get("Alive")]),
                    res.get("CPU", 0), res.get("GPU", 0), ctx.get_node_id()[:8])


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
    if path.exists() and (run.root / "reference" / "final.json").exists():
        return load_checkpoint(path)
    cfg = spec.train_config({k: v for k, v in ref.items() if k != "checkpoint"}, seed=spec.seed)
    if not plan_res["use_gpu"]:
        cfg = cfg.replace(device="cpu")

    @ray.remote
    def train_ref(flat: dict, out: str, plugins: list) -> None:
        from aerl_ray.config import TrainConfig
        from aerl_ray.plugins import load_in_worker
        from aerl_ray.train import fit

        load_in_worker(plugins)
        fit(TrainConfig.from_flat(flat), out, overwrite=True)

    opts = {"num_cpus": float(plan_res.get("cpus_per_worker", 1))}
    if plan_res["use_gpu"]:
        opts["num_gpus"] = float(plan_res.get("gpus_per_worker", 1))
    logger.info("training the transfer reference (%s %s, %d epochs)", cfg.regime.regime,
                cfg.model.model, cfg.epochs)
    ray.get(train_ref.options(**opts).remote(cfg.to_flat(), str(path.parent),
                                             [p.as_dict() for p in spec.plugins]))
    return load_checkpoint(path)


# ---------------------------------------------------------------------------------------
# signals
class _Interrupts:
    """SIGINT/SIGTERM handling in the driver (main thread only).

    While a Tuner runs (``graceful``) the first signal sets ``ledger.interrupted``: the
    searcher starts nothing new, the stopper stops each running trial after its next
    (checkpointed) report, uncommitted trials stay RUNNING for ``--resume``.  A second
    signal, or one outside a Tuner, raises :class:`SweepInterrupted` at once."""

    def __init__(self, ledger: Ledger | None, run_dir: Path | None):
        self.ledger, self.run_dir = ledger, run_dir
        self.graceful = False
        self.hard = False  # a signal raised SweepInterrupted (Ray may wrap it in SystemError)
        self._old: dict[int, object] = {}

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, sig, frame) -> None:
        if self.graceful and self.ledger is not None and not self.ledger.interrupted.is_set():
            self.ledger.interrupted.set()
            logger.warning("%s: finishing the running epochs and evaluations, starting "
                           "nothing new (press Ctrl-C again to stop at once; the unfinished "
                           "epochs are re-done on --resume)", signal.Signals(sig).name)
            return
        self.hard = True
        raise SweepInterrupted(self.run_dir, signal.Signals(sig).name)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _tune_env():
    """Tune settings of the sweep's Tuner only (restored after, for library callers):
    the driver handles Ctrl-C itself; the live view (aerl_ray.progress) replaces Tune's
    output, whose new engine prints an experiment box and a TensorBoard hint into Ray's
    temp dir even at verbose=0; TensorBoard is written by aerl_ray.tbwriter; Tune's
    experiment-state snapshots are not what resume reads (the ledger is), so their
    "snapshotting triggered multiple times" warning, which broke into the live table, is
    off."""
    want = {"TUNE_DISABLE_SIGINT_HANDLER": "1", "RAY_AIR_NEW_OUTPUT": "0",
            "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
            "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
    old = {k: os.environ.get(k) for k in want}
    os.environ.update(want)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stopper(ledger: Ledger):
    from ray.tune import Stopper

    class InterruptStopper(Stopper):
        """Stops each trial at its next report once the sweep is interrupted."""

        def __call__(self, trial_id: str, result: dict) -> bool:
            return ledger.interrupted.is_set()

        def stop_all(self) -> bool:
            return False

    return InterruptStopper()


# ---------------------------------------------------------------------------------------
# the driver
@dataclass
class _Setup:
    run: R.RunDir
    spec: SweepSpec
    run_id: str
    study_name: str
    optuna_url: str
    storage: str | None
    flags: dict
    resume: bool
    saved: dict = field(default_factory=dict)
    command: str = ""


def _prepare(space, run_dir, *, storage, optuna_storage, resume, smoke, num_samples,
             overrides, plugins=()) -> _Setup:
    """Resolve the spec and run identity, and check all flags (nothing is written)."""
    flags = {"space": str(Path(space).resolve()) if space else None, "smoke": smoke,
             "num_samples": num_samples, "overrides": overrides or None, "storage": storage,
             "optuna_storage": optuna_storage, "plugins": list(plugins) or None}
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
        if "flags" in saved:
            try:
                resume_flags(saved, flags)
            except PreflightError as e:
                raise SweepError(str(e)) from None
        spec = parse_space(saved["space"], saved["space_file"])
        return _Setup(run, spec, saved["run_id"], saved["study_name"], saved["optuna_storage"],
                      saved.get("storage"), saved.get("flags", flags), True, saved)
    space = Path(space or DEFAULT_SPACE)
    extra = dict(overrides or {})
    if num_samples:
        extra["num_samples"] = num_samples
    spec = load_space(space, smoke=smoke, overrides=extra or None, plugins=plugins)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = R.RunDir(run_dir or Path("runs") / f"{spec.name}-{stamp}")
    if run.is_run_dir():
        raise SweepError(f"{run.root} already holds a sweep; use --resume {run.root} to "
                         "continue it or choose another --run-dir")
    run_id = f"{spec.name}-{stamp}-{uuid.uuid4().hex[:6]}"
    flags["space"] = str(space.resolve())
    try:
        storage = check_storage_writable(storage)
    except PreflightError as e:
        raise SweepError(str(e)) from None
    return _Setup(run, spec, run_id, run_id, optuna_storage or f"sqlite:///{run.optuna_db}",
                  storage, flags, False)


def tune_paths(setup: _Setup) -> tuple[str, str]:
    """(Tune storage path, TensorBoard logdir): under the run dir, or, with --storage,
    STORAGE/<run_id>/ -- a run id in every path, so sweeps sharing a storage never meet.
    TensorBoard (written by the driver, aerl_ray.tbwriter) goes to STORAGE/<run_id>/
    tensorboard on a shared path, else RUN/tensorboard."""
    if setup.storage:
        sp = setup.storage.rstrip("/") + "/" + setup.run_id
        tb = sp + "/tensorboard" if "://" not in setup.storage else str(
            setup.run.root / "tensorboard")
    else:
        sp, tb = str(setup.run.tune), str(setup.run.root / "tensorboard")
    return sp, tb


def _tables(spec: SweepSpec) -> tuple[R.Table, R.Table]:
    names = [o.name for o in spec.objectives]
    ptypes = {p.name: R.param_type(p.choices, p.type) for p in spec.params}
    return R.trials_table(names, ptypes), R.confirm_table(names, ptypes)


def run_sweep(space: str | Path | None = None, run_dir: str | Path | None = None, *,
              address: str | None = None, storage: str | None = None,
              optuna_storage: str | None = None, resume: str | Path | None = None,
              smoke: bool = False, num_samples: int | None = None,
              overrides: dict | None = None, num_cpus: int | None = None,
              verbose: int = 1, command: str | None = None,
              plugins: tuple[str, ...] = (), progress: str | None = None) -> SweepResult:
    """Run (or resume) a sweep: search, then confirmation; returns its tables.

    ``overrides`` is deep-merged into the space file (after ``smoke``), e.g.
    ``{"fixed": {"dataset": "npz:/data/mine.npz"}}``.  Raises :class:`SweepError` (bad
    input, before Ray starts where possible) or :class:`SweepInterrupted`."""
    from aerl_ray.progress import resolve_mode

    mode = resolve_mode(progress or ("auto" if verbose else "quiet"))
    with _Interrupts(None, Path(resume) if resume else None) as sig:
        setup = _prepare(space, run_dir, storage=storage, optuna_storage=optuna_storage,
                         resume=resume, smoke=smoke, num_samples=num_samples,
                         overrides=overrides, plugins=plugins)
        setup.command = command or (f"aerl_ray.sweep.run_sweep(space={space!r}, "
                                    f"resume={resume!r}, smoke={smoke!r})")
        spec, run = setup.spec, setup.run
        try:
            check_auto_address(address)
            check_data(spec)
        except PreflightError as e:
            raise SweepError(str(e)) from None
        in_run_dir = setup.optuna_url == f"sqlite:///{run.optuna_db}"
        rdb = None if in_run_dir and not setup.resume else _open(setup.optuna_url)
        from aerl_ray.plugins import runtime_env

        _connect(address, num_cpus, runtime_env(spec.plugins))
        from aerl_ray.cluster import (GpuRequestError, StorageError, check_storage,
                                      cluster_nodes_summary)

        summary = cluster_nodes_summary()
        try:
            check_storage(setup.storage, summary.nodes_possible)
            plan_res = _plan_resources(spec, summary.reachable,
                                       summary.max_gpus_per_node or None)
        except (StorageError, GpuRequestError) as e:
            raise SweepError(str(e)) from e
        # -- from here on the run dir exists ------------------------------------------------
        attempt = _record_start(setup)
        trials_t, confirm_t = _tables(spec)
        ledger = Ledger(run, spec, setup.run_id, setup.study_name,
                        rdb or _open(setup.optuna_url), trials_t, confirm_t)
        sig.ledger, sig.run_dir = ledger, run.root
        reruns, confirm_reruns = [], []
        if setup.resume:
            jobs = _read_confirm_plan(run)
            rep = ledger.reconcile(jobs or ())
            logger.info("resume: %s", rep.summary())
            reruns = [t for t in rep.reruns if t.phase == SEARCH]
            confirm_reruns = [t for t in rep.reruns if t.phase == CONFIRM]
        else:
            ledger.create_study()
        return _run_phases(setup, ledger, plan_res, attempt, reruns, confirm_reruns, sig,
                           mode)


def _open(url: str):
    try:
        return open_storage(url)
    except StorageConnectError as e:
        raise SweepError(str(e)) from e


def _record_start(setup: _Setup) -> int:
    run = setup.run
    run.root.mkdir(parents=True, exist_ok=True)
    saved = setup.saved or {
        "run_id": setup.run_id, "study_name": setup.study_name,
        "optuna_storage": setup.optuna_url, "storage": setup.storage,
        "space_file": str(Path(setup.spec.source).resolve()), "space": setup.spec.raw,
        "smoke": bool(setup.flags.get("smoke")), "flags": setup.flags,
        "objectives": [o.__dict__ for o in setup.spec.objectives], "created_at": time.time(),
        "command": setup.command, "attempts": []}
    saved.setdefault("attempts", []).append({"started_at": time.time(),
                                             "command": setup.command})
    setup.saved = saved
    R.write_json_atomic(run.spec, saved)
    return len(saved["attempts"]) - 1


def _read_confirm_plan(run: R.RunDir):
    from aerl_ray.confirm import read_plan

    return read_plan(run)


def _run_phases(setup: _Setup, ledger: Ledger, plan_res: dict, attempt: int, reruns,
                confirm_reruns, sig: _Interrupts, mode: str) -> SweepResult:
    import ray

    from aerl_ray.evalpool import CONFIRM_PLAN, SEARCH_PLAN, confirm_plan_spec, start_pool

    spec, run = setup.spec, setup.run
    reference = _train_reference(spec, run, plan_res)
    ev = spec.evaluation
    plans = {SEARCH_PLAN: dict(ev)}
    if spec.confirm.get("enabled"):
        plans[CONFIRM_PLAN] = confirm_plan_spec(spec)
    dispatcher = f"eval-{setup.run_id}"
    pool = start_pool(dispatcher, NAMESPACE, int(ev.get("actors", 1)), plans, reference,
                      spec.seed, float(ev.get("cpus_per_actor", 0.5)),
                      float(ev.get("gpus_per_actor", 0)) if plan_res["use_gpu"] else 0.0,
                      plugins=[p.as_dict() for p in spec.plugins])
    storage_path, tb_dir = tune_paths(setup)
    meta = {"run_id": setup.run_id, "fixed": dict(spec.fixed),
            "objectives": [o.__dict__ for o in spec.objectives], "resources": plan_res,
            "mode": plan_res["mode"], "base_seed": spec.seed,
            "scheduler_metric": spec.scheduler.get("metric"), "dispatcher": dispatcher,
            # epochs at which a multi-objective scheduler's rungs need val_robust_acc
            "robust_epochs": [int(m) - 1 for m in spec.scheduler.get("milestones", ())],
            "namespace": NAMESPACE, "train_storage": storage_path.rstrip("/") + "/train",
            "plugins": [p.as_dict() for p in spec.plugins]}
    fit_seconds = float("nan")
    try:
        new = max(0, spec.num_samples - ledger.asked())
        if reruns or new:
            logger.info("sweep %s: search, %d trials (%d to run, %d re-run), %d concurrent "
                        "(%s mode), run dir %s", setup.run_id, spec.num_samples, new,
                        len(reruns), plan_res["concurrency"], plan_res["mode"], run.root)
            t0 = time.perf_counter()
            _fit(ledger, f"search-{attempt}", reruns, True, len(reruns) + new, meta, plan_res,
                 storage_path, tb_dir, sig, mode)
            fit_seconds = time.perf_counter() - t0
        if spec.confirm.get("enabled"):
            jobs = _confirm_jobs(setup, ledger)
            pending = confirm_reruns or [j for j in jobs if not ledger.is_committed(CONFIRM,
                                                                                   j.key)]
            if pending:
                logger.info("confirmation: %d configurations x %d seeds on the test split "
                            "(%d to run)", len({j.config_id for j in jobs}),
                            int(spec.confirm["seeds"]), len(pending))
                _fit(ledger, f"confirm-{attempt}", pending, False, len(pending), meta, plan_res,
                     storage_path, tb_dir, sig, mode)
    finally:
        ray.kill(pool)
    ledger.compact()
    return collect(run, spec, fit_seconds, plan_res["concurrency"], setup)


def _confirm_jobs(setup: _Setup, ledger: Ledger):
    from aerl_ray.confirm import choose_configs, plan_jobs, read_plan, write_plan

    jobs = read_plan(setup.run)
    if jobs is None:
        trials = R.read_table(setup.run.trials, key=R.TRIAL_KEY)
        configs = choose_configs(trials, setup.spec)
        seeds = set(trials["train_seed"].dropna().astype(int)) if len(trials) else set()
        jobs = plan_jobs(setup.spec, configs, seeds)
        write_plan(setup.run, jobs)
    return jobs


def _fit(ledger: Ledger, name: str, tickets, new_trials: bool, count: int, meta: dict,
         plan_res: dict, storage_path: str, tb_dir: str, sig: _Interrupts, mode: str
         ) -> None:
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from aerl_ray.tbwriter import tensorboard_callback

    from aerl_ray.progress import Board, progress_callback
    from aerl_ray.recorder import results_callback
    from aerl_ray.trial import trial_fn

    spec = ledger.spec
    searcher = searcher_class()(ledger, tickets, new_trials=new_trials)
    scheduler = None
    concurrency = plan_res["concurrency"]
    if spec.scheduler.get("type") == "moasha" and new_trials:
        scheduler = _moasha(ledger)
        if spec.scheduler["mode"] == "promote":
            concurrency = None  # a limiter counts paused trials as running (resources bound it)
    if spec.scheduler.get("type") == "asha" and new_trials:
        from ray.tune.schedulers import ASHAScheduler

        s = spec.scheduler
        scheduler = ASHAScheduler(metric=s["metric"], mode=s.get("mode", "max"),
                                  time_attr="epochs_done",
                                  grace_period=int(s.get("grace_period", 1)),
                                  reduction_factor=float(s.get("reduction_factor", 2)),
                                  max_t=int(spec.fixed.get("epochs", 1000)) + 1)
    board = Board(f"{name.split('-')[0]} {ledger.run_id}", count, plan_res["concurrency"],
                  [o.name for o in spec.objectives])
    run_config = tune.RunConfig(
        name=name, storage_path=storage_path,
        # the results writer first: the live view shows what it committed
        callbacks=[results_callback(ledger), progress_callback(board, mode, ledger),
                   tensorboard_callback(tb_dir, [o.name for o in spec.objectives]),
                   JsonLoggerCallback(), CSVLoggerCallback()],  # Tune's TBX logger: off
        verbose=0, stop=_stopper(ledger),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.keep_checkpoints),
        failure_config=tune.FailureConfig(max_failures=1))
    tuner = tune.Tuner(
        tune.with_resources(trial_fn, plan_res["trial_resources"]),
        param_space={"_aerl": meta}, run_config=run_config,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=count,
            trial_dirname_creator=lambda t: f"trial_{t.config['_trial']['key']}",
            # a new trial reuses a finished trial's process: no re-import of torch/Ray
            reuse_actors=True, max_concurrent_trials=concurrency))
    sig.graceful = True
    try:
        with _tune_env():
            tuner.fit()
    except BaseException as e:
        if sig.hard and not isinstance(e, SweepInterrupted):  # raised inside ray.wait, which
            raise SweepInterrupted(ledger.run.root, "second signal") from None  # wraps it
        raise
    finally:
        sig.graceful = False
    if ledger.interrupted.is_set():
        raise SweepInterrupted(ledger.run.root)


def _moasha(ledger: Ledger):
    """The multi-objective scheduler, rebuilt from the decisions the run dir holds (a
    resumed sweep loses no rung decision); trials are named by their ledger ids."""
    from aerl_ray.ledger import Ticket
    from aerl_ray.moasha import MOASHA

    s = ledger.spec.scheduler
    return MOASHA.from_records(
        ledger.rung_records(), s["rung_metrics"], s["modes"], time_attr="epochs_done",
        grace_period=s["grace_period"], reduction_factor=s["reduction_factor"],
        max_t=s["max_t"], mode=s["mode"], noise_aware=s["noise_aware"],
        # a trial that reaches its last epoch is evaluated, not stopped at max_t
        stop_last_trials=False,
        trial_key=lambda t: Ticket.of(t.config).key, on_decision=ledger.record_rung)


def collect(run: R.RunDir, spec: SweepSpec, fit_seconds: float = float("nan"),
            concurrency: int = 1, setup: _Setup | None = None) -> SweepResult:
    """The run dir's tables as a :class:`SweepResult` (the search front, the confirmed
    table)."""
    from aerl_ray.confirm import confirmed_table

    trials = R.read_table(run.trials, key=R.TRIAL_KEY)
    objectives = [o.__dict__ for o in spec.objectives]
    confirmed = confirmed_table(R.read_table(run.confirm, key=R.CONFIRM_KEY),
                                R.read_table(run.evals, key=R.EVAL_KEY))
    paths = {}
    if setup is not None:
        sp, tb = tune_paths(setup)
        paths = {"tune": sp, "tensorboard": tb}
    return SweepResult(run.root, trials, search_front(trials, spec.objectives), objectives,
                       fit_seconds, concurrency, confirmed, paths)


# ---------------------------------------------------------------------------------------
# CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aerl_ray.sweep",
        description="Multi-objective (clean vs robust accuracy) search over training regimes "
                    "on the validation split, then a confirmation of the front on the test "
                    "split with new seeds: Ray Tune + Optuna trials that train with Ray Train "
                    "and are evaluated by a shared evaluator actor pool.")
    p.add_argument("--space", default=None,
                   help=f"search-space YAML (default: {DEFAULT_SPACE.relative_to(DEFAULT_SPACE.parent.parent)})")
    p.add_argument("--run-dir", default=None, help="output dir (default runs/<name>-<time>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a killed or interrupted sweep (give no flags that change it)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (auto on a cluster node); default: a local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    p.add_argument("--storage", default=os.environ.get("AERL_STORAGE"),
                   help="Ray Train/Tune storage: shared path or URI (s3://...); required on "
                        "multi-node clusters; runs write under STORAGE/<run_id>/; default: "
                        "$AERL_STORAGE or the run dir")
    p.add_argument("--optuna-storage", default=os.environ.get("AERL_OPTUNA_STORAGE"),
                   help="SQLAlchemy URL of the Optuna study (default: $AERL_OPTUNA_STORAGE or "
                        "sqlite:///RUN/optuna.db)")
    p.add_argument("--num-samples", type=int, default=None, help="override num_samples")
    p.add_argument("--smoke", action="store_true",
                   help="apply the space's smoke: overrides (tiny runs, for tests)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_PATH",
                   help="import your own regimes/models/attacks/datasets first (a module "
                        "name, a .py file or a package dir; repeatable; added to the space's "
                        "plugins:)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report at the end")
    p.add_argument("--progress", default="auto", choices=("auto", "table", "lines", "quiet"),
                   help="live view: table (redrawn in place), lines (one log line per epoch "
                        "and trial: CI, job logs), quiet; auto = table on a terminal, else "
                        "lines")
    p.add_argument("--quiet", action="store_true", help="same as --progress quiet")
    p.add_argument("--log-level", default="INFO")
    return p


def format_pareto(res: SweepResult) -> str:
    """The search front (and trials tied with it within noise), with 95% intervals."""
    f = res.pareto
    if f.empty:
        return "(no completed trials)"
    f = f[f["front_status"].isin(["front", "tied within noise"])]
    lines = []
    names = [o["name"] for o in res.objectives]
    params = sorted(c for c in f.columns if c.startswith("p_") and c != "p_regime"
                    and f[c].notna().any())
    head = ["trial", "regime", *[f"{n} [95% CI] (n)" for n in names], "status",
            "masking", *[c[2:] for c in params]]
    body = []
    for _, r in f.iterrows():
        cells = [str(r["trial_id"]), str(r["regime"])]
        for n in names:
            lo, hi, k = r.get(f"obj_{n}_low"), r.get(f"obj_{n}_high"), r.get(f"obj_{n}_n")
            cells.append(f"{r[f'obj_{n}']:.3f} [{lo:.3f},{hi:.3f}] ({int(k)})"
                         if pd.notna(lo) and pd.notna(k) else f"{r[f'obj_{n}']:.3f}")
        status = r["front_status"] + (f" with {r['tied_with']}" if r.get("tied_with") else "")
        cells += [status, "YES" if bool(r.get("masking_suspected")) else ""]
        cells += ["" if pd.isna(r.get(c)) else (f"{r[c]:.3g}" if isinstance(r[c], float)
                                                else str(r[c])) for c in params]
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def format_confirmed(res: SweepResult, spec: SweepSpec | None = None) -> str:
    """The confirmed table on test: per configuration, clean and the objectives' attacks
    at their budgets (mean ± half the 95% interval across seeds; ±w the mean within-seed
    Wilson half-width)."""
    from aerl_ray.confirm import fmt_interval

    c = res.confirmed
    if c.empty:
        return "(no confirmed configurations)"
    heads = [(o["attack"], o["norm"], o["eps"]) for o in res.objectives if o.get("attack")]
    from aerl_ray.attacks.threat import Norm, parse_eps

    lines = [f"{'config':<8}{'regime':<9}{'seeds':>6}  {'clean (test)':<22}"
             + "".join(f"{a + ' ' + Norm.parse(n).value + ' ' + str(e):<30}" for a, n, e in heads)
             + "  why"]
    for cid, g in c.groupby("config_id", sort=True):
        first = g.iloc[0]
        cells = [f"{cid:<8}{first['regime']:<9}{int(first['seeds']):>6}  "
                 f"{fmt_interval(first['clean_mean'], first['clean_low'], first['clean_high']):<22}"]
        for a, n, e in heads:
            m = g[(g["attack"] == a) & (g["norm"] == Norm.parse(n).value)
                  & ((g["eps"] - parse_eps(e)).abs() < 1e-9)]
            if len(m):
                r = m.iloc[0]
                cells.append(f"{fmt_interval(r['robust_mean'], r['robust_low'], r['robust_high'])}"
                             f" (±w {r['wilson_half']:.3f})".ljust(30))
            else:
                cells.append("-".ljust(30))
        lines.append("".join(cells) + "  " + str(first["why"])
                     + ("  MASKING" if first["masking_suspected"] else ""))
    return "\n".join(lines)


def command_line(argv: list[str] | None) -> str:
    import shlex

    return " ".join(["python -m aerl_ray.sweep",
                     *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])


def main(argv: list[str] | None = None) -> int:
    from aerl_ray.cli import fail, setup_logging
    from aerl_ray.config import ConfigError

    parser = build_parser()
    ns = parser.parse_args(argv)
    setup_logging(ns.log_level)
    try:
        res = run_sweep(ns.space, ns.run_dir, address=ns.address, storage=ns.storage,
                        optuna_storage=ns.optuna_storage, resume=ns.resume, smoke=ns.smoke,
                        num_samples=ns.num_samples, num_cpus=ns.num_cpus,
                        command=command_line(argv), plugins=tuple(ns.plugin),
                        progress="quiet" if ns.quiet else ns.progress)
    except (SweepError, SpaceError, ConfigError) as e:
        fail(parser, e)
    except (SweepInterrupted, KeyboardInterrupt) as e:
        where = getattr(e, "run_dir", None)
        parser.exit(130, f"interrupted; resume with python -m aerl_ray.sweep --resume {where}\n"
                    if where and R.RunDir(where).is_run_dir()
                    else "interrupted before the sweep started; nothing was written\n")
    run = R.RunDir(res.run_dir)
    done = res.trials[res.trials["status"] == "COMPLETE"] if not res.trials.empty else res.trials
    names = " vs ".join(o["name"] for o in res.objectives)
    print(f"\n{len(done)} of {len(res.trials)} search trials completed.  Search front on the "
          f"validation split ({names}; 95% Wilson intervals):")
    print(format_pareto(res))
    print(f"\nrun dir:      {run.root}\nresults:      {run.trials}  {run.evals}  {run.confirm}"
          f"\ntensorboard:  tensorboard --logdir {res.paths.get('tensorboard', run.tune)}"
          f"\noptuna:       optuna-dashboard {json.loads(run.spec.read_text())['optuna_storage']}")
    if not ns.no_report:
        from analysis.report import write_report

        rep = write_report(run.root, command=command_line(argv))
        print(f"\nreport:       {rep.paths['report.html']}")
    if not res.confirmed.empty:
        print("\nConfirmed on the test split (retrained with new seeds; mean ± half the 95% "
              "interval across seeds, ±w = mean within-seed Wilson half-width):")
        print(format_confirmed(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
