"""Cluster helpers: offline validation of Ray cluster-launcher YAMLs, and the checks the
sweep makes against a running cluster (shared storage, GPU requests, cluster size).

    python -m aerl_ray.cluster validate cluster.yaml [cluster.local.yaml ...] [--strict]

Validation runs the same steps ``ray up`` runs before it talks to the cloud
(``prepare_config`` merges the provider's defaults, ``validate_config`` checks Ray's JSON
schema and cross-field rules) plus a few project rules. No network, no boto3. Those two
functions are private Ray API, so this module is tied to the pinned ray==2.60.0.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import yaml

logger = logging.getLogger(__name__)

SHARED_STORAGE_ENV = "AERL_SHARED_STORAGE"
PLACEHOLDER = "CHANGE-ME"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # written by `ray up` on the head
_NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "ceph", "glusterfs", "gpfs", "beegfs")
GPU_YAML_HINT = (
    "add GPU nodes: in cluster.yaml give a node type a GPU instance "
    "(`available_node_types.<type>.node_config.InstanceType`, e.g. g5.xlarge) with "
    "`resources: {GPU: 1}` and `max_workers` > 0 (on-prem: put GPU hosts in "
    "`provider.worker_ips`), or request 0 GPUs (use_gpu='auto' falls back to CPU)"
)


class ClusterConfigError(ValueError):
    """A cluster YAML that `ray up` would reject (or that breaks a project rule)."""


class StorageError(ValueError):
    """Run storage that worker nodes cannot reach."""


class GpuRequestError(ValueError):
    """A GPU request the cluster can never satisfy."""


# ---------------------------------------------------------------- offline validation


def validate_cluster_file(path: str | os.PathLike, *, strict: bool = False) -> dict:
    """Validate a cluster YAML offline; return the prepared config (defaults merged in).

    Raises ClusterConfigError naming the file and the problem. With ``strict``, leftover
    CHANGE-ME placeholders are errors too (otherwise they are logged as warnings).
    """
    p = Path(path)

    def fail(msg: str):
        raise ClusterConfigError(f"{p}: {msg}")

    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as e:
        fail(f"cannot read the file ({e.strerror})")
    except yaml.YAMLError as e:
        fail(f"not valid YAML: {e}")
    if not isinstance(raw, dict):
        fail("the top level must be a mapping of cluster settings")
    _precheck(raw, fail)

    import click
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(raw))
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        fail(_describe_schema_error(e))
    except click.ClickException as e:  # cli_logger.abort (local provider checks)
        fail(e.message)
    except (ValueError, TypeError, AttributeError, KeyError, RuntimeError,
            NotImplementedError, AssertionError) as e:
        fail(f"{type(e).__name__}: {e}")
    _project_checks(raw, fail, strict=strict, name=str(p), source=p.read_text())
    return prepared


def _precheck(raw: dict, fail) -> None:
    """What prepare_config would crash on (KeyError) or abort on with a printed panic."""
    from ray.autoscaler._private.providers import _DEFAULT_CONFIGS

    provider = raw.get("provider")
    if provider is None:
        fail("missing required key 'provider' "
             "(e.g. `provider: {type: aws, region: us-west-2}`)")
    if not isinstance(provider, dict) or "type" not in provider:
        fail("'provider' must be a mapping with a 'type' (aws, gcp, azure, local, ...)")
    known = sorted([*_DEFAULT_CONFIGS, "external", "kuberay"])
    if provider["type"] not in known:
        fail(f"unknown provider type {provider['type']!r}; known: {', '.join(known)}")
    if provider["type"] == "local":
        for key in ("available_node_types", "head_node", "worker_nodes"):
            if raw.get(key):
                fail(f"'{key}' is not supported with the local (on-prem) provider; "
                     "list the hosts in provider.head_ip / provider.worker_ips instead")
        if "coordinator_address" not in provider and not (
            "head_ip" in provider and "worker_ips" in provider
        ):
            fail("the local provider needs provider.head_ip and provider.worker_ips")


def _describe_schema_error(e) -> str:
    where = "/".join(str(x) for x in e.absolute_path) or "the top level"
    if e.validator == "additionalProperties" and isinstance(e.instance, dict):
        allowed = list(e.schema.get("properties", {}))
        unknown = sorted(set(e.instance) - set(allowed))
        if e.schema.get("patternProperties"):
            return f"{e.message} (at {where})"
        parts, guessed = [], True
        for key in unknown:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            guessed &= bool(close)
            parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        tail = "" if guessed else f"; allowed: {', '.join(allowed)}"
        return f"unknown key {', '.join(parts)} at {where}{tail}"
    if e.validator == "required":
        return f"missing required key: {e.message} (at {where})"
    return f"{e.message} (at {where})"


def _project_checks(raw: dict, fail, *, strict: bool, name: str, source: str = "") -> None:
    ptype = raw["provider"]["type"]
    if ptype != "local" and "setup_commands" not in raw:
        fail("'setup_commands' is not set: Ray's defaults would pip-install a Ray nightly; "
             "install the pinned project (`pip install -c constraints.txt -e ...`)")
    if ptype == "aws" and "head_setup_commands" in raw and not any(
        "boto3" in c for c in raw["head_setup_commands"] or []
    ):
        fail("'head_setup_commands' replaces the AWS default `pip install boto3`, which "
             "the head's autoscaler needs; add it back")
    head_start = raw.get("head_start_ray_commands")
    if head_start is not None:
        text = " ".join(head_start)
        if "--autoscaling-config" not in text:
            fail("'head_start_ray_commands' lacks --autoscaling-config="
                 "~/ray_bootstrap_config.yaml, so no autoscaler would run")
        if "--include-dashboard=false" in text.replace(" ", "=").lower():
            fail("the dashboard must stay on: Ray Train's placement-group cleanup uses it")
        if "--dashboard-host=0.0.0.0" in text:
            logger.warning("%s: the dashboard listens on 0.0.0.0; prefer 127.0.0.1 and "
                           "`ray dashboard`", name)
    starts = [*(raw.get("head_start_ray_commands") or []),
              *(raw.get("worker_start_ray_commands") or [])]
    if not any("RAY_AUTH_MODE=token" in c for c in starts):
        logger.warning("%s: start commands do not export RAY_AUTH_MODE=token", name)
    holes = sorted(set(_placeholders(raw)))
    # a value marked CHANGE-ME in a comment (e.g. `head_ip: 10.0.0.10  # CHANGE-ME`) is a
    # placeholder too, though YAML drops the comment
    holes += [f"line {i}: {ln.split('#')[0].strip() or ln.strip()}"
              for i, ln in enumerate(source.splitlines(), 1)
              if PLACEHOLDER in ln and "#" in ln and PLACEHOLDER in ln[ln.index("#"):]
              and not ln.lstrip().startswith("#")]
    if holes:
        msg = f"replace the {PLACEHOLDER} placeholders at: {', '.join(holes)}"
        if strict:
            fail(msg)
        logger.warning("%s: %s", name, msg)


def _placeholders(node: Any, where: str = "") -> list[str]:
    if isinstance(node, dict):
        return [h for k, v in node.items()
                for h in _placeholders(v, f"{where}/{k}" if where else str(k))]
    if isinstance(node, list):
        return [h for i, v in enumerate(node) for h in _placeholders(v, f"{where}[{i}]")]
    return [where] if isinstance(node, str) and PLACEHOLDER in node else []


def config_max_resources(config: Mapping) -> dict[str, float]:
    """Upper bound of each resource a prepared config can reach (head + all max workers).

    Empty for node types whose resources are auto-detected (e.g. the local provider).
    """
    total: dict[str, float] = {}
    cap = config.get("max_workers")
    for name, nt in config.get("available_node_types", {}).items():
        count = 1 if name == config.get("head_node_type") else nt.get("max_workers", 0)
        if cap is not None and name != config.get("head_node_type"):
            count = min(count, cap)
        for res, amount in (nt.get("resources") or {}).items():
            total[res] = total.get(res, 0) + amount * count
    return total


# ---------------------------------------------------------------- runtime checks


def check_storage(storage: str | None, num_nodes: int, *,
                  shared: bool | None = None) -> str | None:
    """Return the storage to hand to RunConfig(storage_path=...), or raise StorageError.

    URIs (s3://, gs://, ...) are fine. A local path is fine on one node; on several nodes it
    must be a shared mount at the same path everywhere, which only the user can vouch for:
    ``shared=True`` or env AERL_SHARED_STORAGE=1 (Ray Train still verifies it with a marker
    file). ``None`` (Ray's head-local default ~/ray_results) is refused on several nodes.
    Pass ``ClusterSummary.nodes_possible`` as ``num_nodes`` so workers not yet up count.
    """
    if shared is None:
        shared = os.environ.get(SHARED_STORAGE_ENV, "").strip().lower() in ("1", "true", "yes")
    if not storage:
        if num_nodes > 1:
            raise StorageError(
                f"no storage given on a {num_nodes}-node cluster: Ray's default ~/ray_results "
                "is on the head only; pass --storage s3://bucket/prefix or a shared path")
        return None
    parsed = urlparse(storage)
    if len(parsed.scheme) > 1 and "://" in storage and parsed.scheme != "file":
        if not parsed.netloc:
            raise StorageError(f"storage URI {storage!r} has no bucket/host")
        return storage
    local = parsed.path if parsed.scheme == "file" else storage
    path = os.path.abspath(os.path.expanduser(local))
    if num_nodes <= 1 or shared:
        if num_nodes > 1:
            logger.info("storage %s is treated as shared by all %d nodes (%s)", path,
                        num_nodes, SHARED_STORAGE_ENV)
        return path
    fstype = _fs_type(path)
    hint = (f" ({path} is on a {fstype} mount, so this may be the case)"
            if fstype in _NETWORK_FS else "")
    raise StorageError(
        f"storage {storage!r} is a local path but the cluster has {num_nodes} nodes; Ray Train "
        "refuses it ('A local path on the head node is not accessible by worker nodes'). Use "
        "a URI every node can reach (e.g. --storage s3://bucket/aerl), or, if it is a shared "
        f"mount (NFS/EFS/Lustre) at the same path on every node, set {SHARED_STORAGE_ENV}=1{hint}.")


def _fs_type(path: str) -> str | None:
    """Filesystem type of the mount holding ``path`` (Linux /proc/mounts), else None."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    best = max((m for m in mounts if path == m[0] or path.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1].split(".")[0] if best else None


def check_gpu_request(gpus_per_trial_worker: float, eval_gpus_per_actor: float,
                      cluster_resources: Mapping[str, float], *,
                      gpus_per_node: float | None = None) -> None:
    """Raise GpuRequestError if a GPU request can never be scheduled.

    ``cluster_resources``: what the cluster has or can scale to (ClusterSummary.reachable).
    ``gpus_per_node``: the largest node's GPU count, if known (one worker cannot span nodes).
    """
    total = float(cluster_resources.get("GPU", 0) or 0)
    for name, want in (("resources.gpus_per_worker", gpus_per_trial_worker),
                       ("evaluation.gpus_per_actor", eval_gpus_per_actor)):
        want = float(want)
        if want < 0:
            raise GpuRequestError(f"{name}={want:g} must be >= 0")
        if want == 0:
            continue
        if total <= 0:
            raise GpuRequestError(
                f"{name}={want:g} but the cluster has no GPUs; {GPU_YAML_HINT}")
        if want > 1 and not want.is_integer():
            raise GpuRequestError(
                f"{name}={want:g}: Ray needs whole GPUs above 1 (use <= 1 or an integer)")
        limit = min(total, gpus_per_node) if gpus_per_node else total
        if want > limit:
            raise GpuRequestError(
                f"{name}={want:g} but {'a node' if gpus_per_node else 'the cluster'} has at most "
                f"{limit:g} GPUs; lower it or use bigger GPU instances in cluster.yaml "
                "(`available_node_types.<type>.node_config.InstanceType` and `resources.GPU`)")


def resolve_use_gpu(requested: str | bool, cluster_resources: Mapping[str, float]) -> bool:
    """``"auto"`` → GPUs if the cluster has (or can scale to) any, else CPU; True on a GPU-less
    cluster raises GpuRequestError; False → CPU."""
    has_gpu = float(cluster_resources.get("GPU", 0) or 0) > 0
    if isinstance(requested, str):
        key = requested.strip().lower()
        if key == "auto":
            if not has_gpu:
                logger.info("no GPUs in the cluster: training and evaluation fall back to CPU")
            return has_gpu
        if key not in ("true", "yes", "1", "false", "no", "0"):
            raise ValueError(f"use_gpu must be 'auto', true or false, got {requested!r}")
        requested = key in ("true", "yes", "1")
    if requested and not has_gpu:
        raise GpuRequestError(
            f"resources.use_gpu=true but the cluster has no GPUs; {GPU_YAML_HINT}")
    return bool(requested)


@dataclass(frozen=True)
class ClusterSummary:
    num_nodes: int                  # alive nodes now
    cpus: float                     # totals now (ray.cluster_resources())
    gpus: float
    resources: dict[str, float] = field(default_factory=dict)
    # what the autoscaler can scale up to ({} for a fixed or unknown cluster)
    max_resources: dict[str, float] = field(default_factory=dict)
    max_gpus_per_node: float = 0.0
    max_nodes: int = 0              # nodes the autoscaler may run (0: fixed or unknown)

    @property
    def nodes_possible(self) -> int:
        """Node count to check storage against: several if workers can still join."""
        return max(self.num_nodes, self.max_nodes)

    @property
    def reachable(self) -> dict[str, float]:
        """Per resource, the larger of what exists now and what the autoscaler can add."""
        keys = set(self.resources) | set(self.max_resources)
        return {k: max(self.resources.get(k, 0), self.max_resources.get(k, 0)) for k in keys}


def summarize(nodes: list[dict], resources: Mapping[str, float],
              max_resources: Mapping[str, float] | None = None,
              max_gpus_per_node: float = 0.0, max_nodes: int = 0) -> ClusterSummary:
    alive = [n for n in nodes if n.get("Alive")]
    per_node = max([float(n.get("Resources", {}).get("GPU", 0)) for n in alive]
                   + [max_gpus_per_node])
    return ClusterSummary(len(alive), float(resources.get("CPU", 0)),
                          float(resources.get("GPU", 0)), dict(resources),
                          dict(max_resources or {}), per_node, max_nodes)


def cluster_nodes_summary() -> ClusterSummary:
    """Summarise the connected Ray cluster (call after ray.init)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("cluster_nodes_summary() needs a connected Ray (call ray.init first)")
    return summarize(ray.nodes(), ray.cluster_resources(), *_autoscaler_ceiling())


def _autoscaler_ceiling() -> tuple[dict[str, float], float, int]:
    """(max resources, max GPUs per node, max nodes) the autoscaler may reach, from the GCS
    cluster config, else ~/ray_bootstrap_config.yaml (the head of a `ray up` cluster)."""
    try:
        from ray._private.state import state

        got = state.get_max_resources_from_cluster_config()
        if got:
            groups = state.get_cluster_config().node_group_configs
            per_node = max([float(g.resources.get("GPU", 0)) for g in groups] + [0.0])
            nodes = sum(g.max_count if g.max_count >= 0 else 1000 for g in groups)
            return {k: float(v) for k, v in got.items()}, per_node, nodes
    except Exception as e:  # private API; absent config or older GCS
        logger.debug("no cluster config in GCS: %s", e)
    boot = Path(BOOTSTRAP_CONFIG).expanduser()
    if boot.exists():
        try:
            cfg = yaml.safe_load(boot.read_text())
            types = cfg.get("available_node_types", {})
            per_node = max([float((nt.get("resources") or {}).get("GPU", 0))
                            for nt in types.values()] + [0.0])
            workers = sum(nt.get("max_workers", 0) for name, nt in types.items()
                          if name != cfg.get("head_node_type"))
            nodes = 1 + min(workers, cfg.get("max_workers", workers))
            return config_max_resources(cfg), per_node, nodes
        except (OSError, yaml.YAMLError, AttributeError) as e:
            logger.warning("could not read %s: %s", boot, e)
    return {}, 0.0, 0


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aerl_ray.cluster",
                                 description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate",
                       help="validate cluster YAMLs offline (the checks `ray up` makes first)")
    v.add_argument("files", nargs="+")
    v.add_argument("--strict", action="store_true",
                   help=f"fail on leftover {PLACEHOLDER} placeholders")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    bad = 0
    for f in args.files:
        try:
            cfg = validate_cluster_file(f, strict=args.strict)
        except ClusterConfigError as e:
            logger.error("%s", e)
            bad += 1
            continue
        types = ", ".join(
            f"{n} [{nt.get('node_config', {}).get('InstanceType', 'host')}, "
            f"{nt.get('min_workers', 0)}-{nt.get('max_workers', 0)}]"
            for n, nt in cfg["available_node_types"].items())
        ceiling = config_max_resources(cfg)
        logger.info("%s: OK (provider %s, head %s; node types: %s; max %s)", f,
                    cfg["provider"]["type"], cfg["head_node_type"], types,
                    ceiling or "resources auto-detected")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
