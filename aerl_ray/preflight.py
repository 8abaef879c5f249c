"""Every check that can be done before Ray starts, each a one-line error (exit 2).

Bad input must fail in seconds, before any expensive work and without leaving a run dir
behind: the datasets the space trains on (available? a valid npz? a validation size that
keeps every class? enough validation and test images for the evaluation and confirmation
plans?), the storage (writable?), the Ray address (reachable? someone else's cluster?) and,
on ``--resume``, the flags against those the run was started with.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

# flags that define a sweep: --resume must be given the same ones (or none)
DEFINING_FLAGS = ("space", "smoke", "num_samples", "overrides", "storage", "optuna_storage",
                  "plugins")


class PreflightError(RuntimeError):
    """A check before Ray starts failed; the message says what to change."""


def data_configs(spec) -> list[dict[str, Any]]:
    """The distinct data settings the sweep trains on (fixed, searched, reference)."""
    from aerl_ray.data import SPLIT_KEYS

    base = {k: v for k, v in spec.fixed.items() if k in SPLIT_KEYS}
    variants = [base]
    for p in spec.params:
        if p.name in SPLIT_KEYS and p.type == "categorical":
            variants = [{**v, p.name: c} for v in variants for c in p.choices]
    if spec.reference and not spec.reference.get("checkpoint"):
        variants.append({**base, **{k: v for k, v in spec.reference.items() if k in SPLIT_KEYS}})
    out: list[dict[str, Any]] = []
    for v in variants:
        if v not in out:
            out.append(v)
    return out


def check_data(spec) -> dict[str, dict[str, int]]:
    """Load (downloading if needed, in this process) every dataset the sweep uses and make
    its splits; check the plans' image counts.  Returns dataset -> {train, val, test}."""
    from aerl_ray.data import DatasetUnavailableError, load_splits, split_config
    from aerl_ray.evalpool import confirm_plan_spec

    sizes: dict[str, dict[str, int]] = {}
    for d in data_configs(spec):
        try:
            s = load_splits(split_config(d))
        except DatasetUnavailableError as e:
            raise PreflightError(str(e)) from None
        name = str(d.get("dataset", "digits"))
        sizes[name] = {"train": len(s.y_train), "val": len(s.y_val), "test": len(s.y_test)}
        n = int(spec.evaluation.get("n", 1000) or 0)
        if n > len(s.y_val):
            raise PreflightError(
                f"evaluation.n={n} exceeds the validation split of {name} ({len(s.y_val)} "
                f"images): the search evaluates on validation; lower evaluation.n or raise "
                "val_size / val_fraction in fixed")
        if spec.confirm.get("enabled"):
            cn = int(confirm_plan_spec(spec).get("n") or 0)
            if cn > len(s.y_test):
                raise PreflightError(
                    f"confirm.n={cn} exceeds the test split of {name} ({len(s.y_test)} "
                    "images); lower confirm.n (0 = the search's n)")
    return sizes


def check_storage_writable(storage: str | None) -> str | None:
    """A local --storage must be a writable directory (created if missing); URIs are
    checked by Ray when it writes its first marker."""
    if not storage or "://" in storage and not storage.startswith("file://"):
        return storage
    path = Path(storage.removeprefix("file://")).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".aerl-write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PreflightError(f"--storage {storage}: cannot write there ({e.strerror}); give a "
                             "writable directory or a URI (s3://bucket/prefix)") from None
    return str(path)


def check_auto_address(address: str | None) -> None:
    """``--address auto`` attaches to the Ray cluster running on this machine: refuse when
    that cluster belongs to another user (it would run your trials on their Ray)."""
    if address != "auto":
        return
    import tempfile

    session = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray" / "session_latest"
    if not session.exists():
        raise PreflightError("--address auto: no Ray cluster runs on this machine; start one "
                             "(`ray start --head`, `ray up cluster.yaml`), give its address "
                             "(--address HOST:6379), or omit --address for a private local Ray")
    owner = session.resolve().stat().st_uid
    if owner != os.getuid():
        try:
            import pwd

            who = pwd.getpwuid(owner).pw_name
        except (KeyError, ImportError):
            who = f"uid {owner}"
        raise PreflightError(f"--address auto would attach to a Ray cluster started by {who} "
                             f"({session.resolve()}); give --address HOST:PORT to attach to a "
                             "cluster on purpose, or omit --address for your own local Ray")


def resume_flags(saved: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """Refuse a resume whose defining flags differ from the original run's, naming them."""
    flags = saved.get("flags") or {}
    bad = []
    for k in DEFINING_FLAGS:
        v = given.get(k)
        if v is None or v is False or (k in ("overrides", "plugins") and not v):
            continue  # not given: the original value is used
        old = flags.get(k)
        if k == "space":
            same = old is not None and Path(str(v)).resolve() == Path(str(old)).resolve()
        elif k == "overrides":
            same = json.dumps(v, sort_keys=True, default=str) == json.dumps(
                old, sort_keys=True, default=str)
        else:
            same = v == old
        if not same:
            bad.append(f"--{k.replace('_', '-')} {v!r} (the run was started with {old!r})")
    if bad:
        raise PreflightError("cannot resume with flags that change the sweep: "
                             + "; ".join(bad) + ". Resume with only --resume RUN_DIR (plus "
                             "--address/--num-cpus), or start a new run dir")
