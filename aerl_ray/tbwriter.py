"""TensorBoard for a sweep: one run per trial, written by the driver.

Ray Tune's own TensorBoard logger is turned off in sweeps: it logs every result key (the
sweep's internal ones too) under ``ray/tune/``, warns about tag names such as
``transfer:sl_reference`` and builds HParams from the searcher's flattened config (which
drops parameters a trial did not use).  This callback writes instead, per trial
(``<logdir>/<phase>/<trial id>``, the same directory across resumed attempts):

- ``train/<metric>`` and ``val/<metric>`` scalars per epoch (step = epoch);
- ``eval/<split>/<attack>/<norm>`` scalars: the robustness curve, step = 1000 x eps
  (``pgd``, ``autoattack``, ``transfer:sl_reference``, ``worst_case``: the attack names of
  the results tables);
- HParams: every searched parameter the trial used, with the objectives (``obj/<name>``),
  the validation accuracies and the masking flag as metrics, so TensorBoard's HParams view
  lists every trial with its objectives.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_SKIP = {"epoch", "epochs_done", "selected", "regime_active", "selected_epoch",
         # Ray Tune's own result keys
         "iterations_since_restore", "time_this_iter_s", "time_total_s", "timestamp",
         "training_iteration", "time_since_restore", "pid", "done", "trial_id", "date",
         "hostname", "node_ip", "checkpoint_dir_name"}


def _scalar(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def tensorboard_callback(logdir: str | Path, objectives: list[str]):
    from ray import tune

    from aerl_ray.ledger import Ticket
    from aerl_ray.trial import FINAL_KEY, ROW_KEY

    root = Path(logdir)

    class TensorBoardWriter(tune.Callback):
        def __init__(self):
            self.writers: dict[str, Any] = {}

        def _writer(self, t: Ticket):
            key = f"{t.phase}/{t.key}"
            if key not in self.writers:
                from torch.utils.tensorboard import SummaryWriter

                self.writers[key] = SummaryWriter(str(root / t.phase / t.key))
            return self.writers[key]

        def on_trial_result(self, iteration, trials, trial, result, **info):
            t = Ticket.of(trial.config)
            w = self._writer(t)
            if not result.get(FINAL_KEY):
                if "epoch" not in result:
                    return
                step = int(result["epoch"])
                for k, v in result.items():
                    f = _scalar(v)
                    if f is None or k in _SKIP or k.startswith("aerl") or k.endswith("_n") \
                            or k in objectives or "/" in k:
                        continue
                    w.add_scalar(("val/" + k[4:]) if k.startswith("val_") else f"train/{k}",
                                 f, step)
                w.flush()
                return
            row = json.loads(result.get(ROW_KEY) or "{}")
            for r in json.loads(result.get("eval_rows_json", "[]")):
                w.add_scalar(f"eval/{r['split']}/{r['attack']}/{r['norm']}",
                             float(r["robust_acc"]), int(round(1000 * float(r["eps"]))))
            hparams = {k[2:]: v for k, v in row.items() if k.startswith("p_") and v is not None
                       and isinstance(v, (int, float, str, bool))}
            hparams.update(regime=row.get("regime", ""), phase=t.phase)
            if t.phase != "search":
                hparams["seed"] = int(t.seed)
            metrics = {f"obj/{n}": row.get(f"obj_{n}") for n in objectives}
            metrics.update({"val/acc_selected": row.get("val_acc"),
                            "val/robust_acc_selected": row.get("val_robust_acc"),
                            "masking_suspected": float(bool(row.get("masking_suspected")))})
            metrics = {k: float(v) for k, v in metrics.items() if _scalar(v) is not None}
            w.add_hparams(hparams, metrics, run_name=".")
            w.flush()

        def on_experiment_end(self, trials, **info):
            for w in self.writers.values():
                w.close()
            self.writers.clear()

    return TensorBoardWriter()
