"""What a person sees on a long run: compact progress on the terminal, Ray's own lines in a log file.

Ray prints a lot while serray works: dataset execution plans, Tune's experiment boxes, worker start-up
warnings, every worker's output. :func:`quiet` sends all of that to ``<output_dir>/logs/ray.log``
(Python-level ``stdout``/``stderr`` of the driver, which is also where Ray forwards worker output, and
the ``ray`` loggers), while :func:`echo` keeps writing to the terminal. ``serray -v`` leaves Ray's
output on the terminal; the Ray dashboard shows everything in any case. Errors still reach the
terminal: they are raised in the driver and printed by the CLI after the block ends.

:class:`EpochProgress` is a Ray Tune callback that turns the per-epoch reports of fold trials into one
line each: stage, fold, epoch k/n, the key metrics, elapsed time and an estimate of what is left.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

_TERMINAL = {"stream": None}


def echo(message: str = "") -> None:
    """Print to the terminal, even inside :func:`quiet` (and to its log file, for the record)."""
    stream = _TERMINAL["stream"] or sys.stdout
    print(message, file=stream, flush=True)
    if _TERMINAL["stream"] is not None and sys.stdout is not stream:
        print(message, file=sys.stdout, flush=True)


@contextlib.contextmanager
def quiet(log_dir: str | Path, verbose: bool = False) -> Iterator[Optional[Path]]:
    """Send Ray's console output to ``log_dir/ray.log`` for the duration of the block."""
    if verbose or _TERMINAL["stream"] is not None:
        yield None
        return
    path = Path(log_dir) / "ray.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    ray_logger = logging.getLogger("ray")
    with open(path, "a", buffering=1) as f:
        f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
        handlers = [h for h in ray_logger.handlers if isinstance(h, logging.StreamHandler)
                    and not isinstance(h, logging.FileHandler)]
        old_streams = [h.setStream(f) for h in handlers]
        _TERMINAL["stream"] = sys.stdout
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield path
        finally:
            _TERMINAL["stream"] = None
            for h, s in zip(handlers, old_streams):
                h.setStream(s)


def _fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


class EpochProgress:
    """A Ray Tune callback printing one line per reported epoch of a fold trial.

    Trials report ``stage_id`` (0 pre-training, 1 fine-tuning), ``epoch`` and ``epochs``; the
    estimate of what is left assumes the remaining epochs cost what the finished ones did.
    """

    def __new__(cls, total_epochs: int, label: Callable[[Dict[str, Any]], str], out: Callable[[str], Any] = echo):
        from ray.tune import Callback

        class _EpochProgress(Callback):
            def __init__(self):
                self.done, self.t0 = 0, time.time()

            def on_trial_result(self, iteration, trials, trial, result, **info):
                if "stage_id" not in result:
                    return
                self.done += 1
                elapsed = time.time() - self.t0
                left = elapsed / self.done * max(0, total_epochs - self.done)
                stage = "pre-train" if result["stage_id"] == 0 else "fine-tune"
                metrics = f"loss {result.get('loss', float('nan')):.3f}"
                if "val_ua" in result:
                    metrics += f", val UA {100 * result['val_ua']:.1f}"
                if "teacher_drift" in result:
                    metrics += f", drift t/s {result['teacher_drift']:.3f}/{result['student_drift']:.3f}"
                out(f"[{label(trial.config)}] {stage} epoch {int(result['epoch']) + 1}/{int(result['epochs'])}: "
                    f"{metrics} ({_fmt_minutes(elapsed)} elapsed, about {_fmt_minutes(left)} left)")

            def on_trial_error(self, iteration, trials, trial, **info):
                out(f"[{label(trial.config)}] failed (see {trial.local_path or 'the Ray log'}); rerun the same "
                    "command to resume")

        return _EpochProgress()
