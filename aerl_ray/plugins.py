"""Plugins: a researcher's own regimes, models, attacks and datasets, without editing the
package.

A plugin is a Python module -- an importable name (``mylab.regimes``), a file
(``./my_attacks.py``) or a package directory (``./mylab``) -- that registers into the
package's registries with the package's own decorators::

    from aerl_ray.regimes import REGIMES

    @REGIMES.register("logit_squeeze")
    def logit_squeeze(model, x, y, ctx): ...

(``aerl_ray.models.MODELS``, ``aerl_ray.attacks.register_attack``,
``aerl_ray.data.DATASETS`` likewise).  A space file lists them under ``plugins:`` (paths
relative to the file); every CLI takes ``--plugin`` (repeatable).  They are imported before
anything is validated, so their names are valid everywhere a built-in name is.

On a cluster the code travels with the job: :func:`runtime_env` gives Ray the plugin files
(``py_modules``), and every trial and evaluator imports them by module name
(:func:`load_plugins`).  :func:`code_hash` -- the package's git revision plus each plugin's
source hash -- is recorded in every checkpoint and results row: a result says which code
made it.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

logger = logging.getLogger(__name__)


class PluginError(ImportError):
    """A plugin cannot be found or imported; the message names it and the fix."""


@dataclass(frozen=True)
class Plugin:
    """A loaded plugin: how it was named, its module, where its code is, its hash."""

    spec: str
    module: str
    path: str | None  # the .py file or package directory (None: a built-in module)
    sha: str  # sha1 (12 hex) of its source files

    def as_dict(self) -> dict:
        return asdict(self)


LOADED: dict[str, Plugin] = {}  # module name -> plugin, in this process


def _source_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)


def source_hash(path: str | os.PathLike | None) -> str:
    if path is None:
        return "builtin"
    p = Path(path)
    h = hashlib.sha1()
    for f in _source_files(p):
        h.update(str(f.relative_to(p.parent if p.is_file() else p)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or os.sep in spec or spec.startswith(".")


def resolve(spec: str, base_dir: str | os.PathLike | None = None) -> tuple[str, str | None]:
    """(module name, code path) of a plugin spec; a path is made importable."""
    if _looks_like_path(spec):
        p = Path(spec).expanduser()
        if not p.is_absolute():
            p = Path(base_dir or ".") / p
        p = p.resolve()
        if p.is_file() and p.suffix == ".py":
            module, parent = p.stem, p.parent
        elif p.is_dir() and (p / "__init__.py").is_file():
            module, parent = p.name, p.parent
        else:
            raise PluginError(f"plugin {spec!r}: {p} is neither a .py file nor a package "
                              "directory (with __init__.py); give a module name, a file or a "
                              "package directory")
        if str(parent) not in sys.path:
            sys.path.insert(0, str(parent))
        return module, str(p)
    found = importlib.util.find_spec(spec.split(".")[0])
    if found is None:
        raise PluginError(f"plugin {spec!r}: no module of that name is importable; install "
                          "it, put its directory on PYTHONPATH, or give its path "
                          "(./path/to/module.py or ./package_dir)")
    spec_full = importlib.util.find_spec(spec)
    origin = getattr(spec_full, "origin", None) if spec_full else None
    if origin and origin.endswith("__init__.py"):
        origin = str(Path(origin).parent)
    return spec, origin


def load_plugins(specs: Iterable[str] | None, base_dir: str | os.PathLike | None = None
                 ) -> list[Plugin]:
    """Import each plugin once per process (its registrations run on import)."""
    out: list[Plugin] = []
    for spec in specs or ():
        module, path = resolve(str(spec), base_dir)
        if module in LOADED:
            out.append(LOADED[module])
            continue
        try:
            importlib.import_module(module)
        except PluginError:
            raise
        except Exception as e:  # noqa: BLE001 - the plugin's own error, named
            raise PluginError(f"plugin {spec!r} ({module}) failed to import: "
                              f"{type(e).__name__}: {e}") from e
        plugin = Plugin(str(spec), module, path, source_hash(path))
        LOADED[module] = plugin
        logger.info("plugin %s loaded (%s, source %s)", module, path or "installed", plugin.sha)
        out.append(plugin)
    return out


def loaded() -> list[Plugin]:
    return list(LOADED.values())


def code_hash(plugins: Sequence[Plugin] | None = None) -> str:
    """The package's git revision plus the plugins' source hashes (12 hex), or the
    revision alone without plugins: which code made a result."""
    from aerl_ray.checkpoint import git_revision

    rev = git_revision()
    plugins = loaded() if plugins is None else list(plugins)
    if not plugins:
        return rev[:12] + ("+dirty" if rev.endswith("+dirty") else "")
    h = hashlib.sha1(rev.encode())
    for p in sorted(plugins, key=lambda p: p.module):
        h.update(f"{p.module}:{p.sha}".encode())
    return f"{rev[:12]}+plugins:{h.hexdigest()[:8]}"


def runtime_env(plugins: Sequence[Plugin]) -> dict:
    """Ray ``runtime_env`` that ships the plugins' code to every node (``py_modules``)."""
    mods = sorted({p.path for p in plugins if p.path})
    return {"py_modules": mods} if mods else {}


def module_names(plugins: Sequence[Plugin]) -> list[str]:
    """What a worker imports (the code arrives through ``py_modules``)."""
    return [p.module for p in plugins]


def load_in_worker(entries: Iterable[dict]) -> list[Plugin]:
    """Import a sweep's plugins in a trial or evaluator process: from the driver's path
    when it exists on this node, else by module name (shipped by ``py_modules``)."""
    specs = [e["path"] if e.get("path") and Path(e["path"]).exists() else e["module"]
             for e in entries or ()]
    return load_plugins(specs)
