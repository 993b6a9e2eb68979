"""What a training run tells a person in words: counts, the lines it prints when a run is already
finished or stops on a signal, and the summary at its end.

The lines that name an option name it as the field in backticks (`` `resume` ``); the CLI prints
them through :func:`torchglow.cli.errors.in_flags` (``--resume``), a Python caller reads the field.
"""

from __future__ import annotations

from typing import Any


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 step``, ``2 steps``, ``1,497 training images``; ``many``: an irregular plural."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"


def class_list(names: list[str] | None, limit: int = 10) -> str:
    """``2 classes: cat, ship`` (the first ``limit`` names), or ``unlabelled``."""
    if not names:
        return "unlabelled"
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{plural(len(names), 'class', 'classes')}: {shown}"


def already_finished_line(out: Any, epochs_done: int, steps: int, epochs: int) -> str:
    """A resumed run that has nothing left to do: how to extend it."""
    return (f"{out} is finished ({epochs_done} epochs, {steps} steps); to train longer: torchglow train `resume` "
            f"{out} `epochs` N (N > {epochs}; or a larger `max_steps` / `max_minutes` when one of them ended it)")


def stopped_line(signal_name: str, step: int, out: Any) -> str:
    """A run stopped by a signal: where, and how to go on."""
    return f"stopped by {signal_name} at step {step}; resume with: torchglow train `resume` {out}"


def summary_text(summary: dict[str, Any]) -> str:
    """The end of ``torchglow train`` for a person: the scores, what bits/dim means, where the
    pictures are and what to run next; which weights were scored (the EMA or the raw weights).
    Empty for an interrupted run, whose :func:`stopped_line` the trainer has printed."""
    folder = summary["run"]
    if summary["interrupted_by"]:
        return ""
    lines = []
    if summary["test_bpd"] is not None:
        best = summary["best_test_bpd"]
        weights = (f"the EMA of the weights (decay {summary['ema_decay']:.4g}, with warm-up)"
                   if summary["evaluated_with"] == "ema" else "the raw weights (no EMA)")
        lines.append(f"test {summary['test_bpd']:.4f} bits/dim" + (f" (best {best:.4f}, in best.pt)" if best is not None else "")
                     + f" after {plural(summary['epochs'], 'epoch')}, {plural(summary['steps'], 'step')}, "
                       f"{summary['wall_time_s'] / 60:.1f} min; scored with {weights}")
    lines += [f"baseline (each pixel on its own, counted from the training images): {summary['baseline_bpd']:.4f} "
              f"bits/dim",
              "bits/dim: the code length of a test image per pixel and colour channel under the model; lower is "
              "better, and below the baseline means the model learned how pixels go together",
              f"samples: {summary['samples'] or folder + '/samples/'} (one grid per evaluation), "
              f"learning curve: {folder}/bpd.png",
              f"next: torchglow sample {folder}   torchglow evaluate {folder}"]
    return "\n".join(lines)
