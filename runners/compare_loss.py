"""Compare two loss curves (metrics JSONL files), as loss-parity reports do.

    python -m runners.compare_loss ours.jsonl reference.jsonl --plot parity.png [--key loss]

Each file holds one JSON object per line with "step" and the compared key. The curves are
compared step by step; relative error is |a - b| / |b| (b is the reference). Prints the mean and
max relative and absolute errors; the plot shows both curves above and both errors below.

The comparison fails (exit 1) when a value is NaN or infinite, when a step is logged in one file
only (unless `--common-steps`: then only the shared steps are compared, e.g. for runs logged at
different intervals), or when the max relative error exceeds `--max-rel-error`. Files that
cannot be read are errors (exit 2).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lib import cli
from lib.errors import UserError

SHOWN = 5  # steps listed in a report line before "..."


def read_metric(path: str | Path, key: str) -> dict[int, float]:
    """{step: value} for every line of a JSONL file that has `key` (lines without it are skipped,
    so a log mixing train and validation records still works)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    values: dict[int, float] = {}
    lines: dict[int, int] = {}  # step -> the line that logged it
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (a binary file, not a metrics JSONL?)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON: {e}") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {line.strip()[:60]!r}")
            if key not in record:
                continue
            if "step" not in record:
                raise UserError(f"{path}:{lineno}: record has {key!r} but no 'step'")
            try:
                step, value = int(record["step"]), float(record[key])
            except (TypeError, ValueError, OverflowError):
                raise UserError(f"{path}:{lineno}: step {record['step']!r} / {key} {record[key]!r} "
                                "are not numbers") from None
            if step in lines:  # two runs appended to one log: which curve is meant?
                raise UserError(f"{path}:{lineno}: step {step} already has a {key!r} on line {lines[step]}")
            values[step], lines[step] = value, lineno
    if not values:
        raise UserError(f"{path}: no record has the key {key!r}")
    return values


@dataclass(frozen=True)
class Comparison:
    """Two curves on their shared steps, and what does not line up between them.

    The error statistics cover the shared steps where both values are finite; `nonfinite` lists
    the others, so one NaN can neither hide (max() skips NaN depending on its position) nor
    turn every statistic into NaN.
    """
    steps: list[int]
    a: list[float]
    b: list[float]
    abs_err: list[float]
    rel_err: list[float]
    only_a: list[int]      # steps logged in the first file only
    only_b: list[int]      # steps logged in the reference only
    nonfinite: list[int]   # shared steps where either value is NaN or infinite

    def _finite(self, errors: list[float]) -> list[float]:
        bad = set(self.nonfinite)
        return [e for s, e in zip(self.steps, errors) if s not in bad] or [math.nan]

    @property
    def mean_abs(self) -> float:
        errors = self._finite(self.abs_err)
        return sum(errors) / len(errors)

    @property
    def max_abs(self) -> float:
        return max(self._finite(self.abs_err))

    @property
    def mean_rel(self) -> float:
        errors = self._finite(self.rel_err)
        return sum(errors) / len(errors)

    @property
    def max_rel(self) -> float:
        return max(self._finite(self.rel_err))


def compare(a: dict[int, float], b: dict[int, float]) -> Comparison:
    """Align two {step: value} curves on their common steps; b is the reference."""
    steps = sorted(set(a) & set(b))
    if not steps:
        raise UserError(f"the files share no step (first: steps {min(a)}..{max(a)}, "
                        f"second: steps {min(b)}..{max(b)})")
    av, bv = [a[s] for s in steps], [b[s] for s in steps]
    abs_err = [abs(x - y) for x, y in zip(av, bv)]
    rel_err = [e / abs(y) if y != 0 else (0.0 if e == 0 else math.inf) for e, y in zip(abs_err, bv)]
    nonfinite = [s for s, x, y in zip(steps, av, bv) if not (math.isfinite(x) and math.isfinite(y))]
    return Comparison(steps, av, bv, abs_err, rel_err, only_a=sorted(set(a) - set(b)),
                      only_b=sorted(set(b) - set(a)), nonfinite=nonfinite)


def _steps_text(steps: list[int]) -> str:
    shown = ", ".join(map(str, steps[:SHOWN]))
    return f"{len(steps)} step{'s' * (len(steps) != 1)} ({shown}{', ...' if len(steps) > SHOWN else ''})"


def failures(cmp: Comparison, names: tuple[str, str], common_steps: bool = False,
             max_rel_error: float | None = None) -> list[str]:
    """Why the comparison fails, one line per reason; empty when it passes."""
    out = []
    if cmp.nonfinite:
        values = {s: (x, y) for s, x, y in zip(cmp.steps, cmp.a, cmp.b)}
        first = cmp.nonfinite[0]
        out.append(f"non-finite values at {_steps_text(cmp.nonfinite)}; first: step {first} "
                   f"{values[first][0]} ({names[0]}) vs {values[first][1]} ({names[1]})")
    if not common_steps:
        for only, name in ((cmp.only_a, names[0]), (cmp.only_b, names[1])):
            if only:
                out.append(f"{_steps_text(only)} only in {name} (the curves do not line up; "
                           "--common-steps compares the shared steps only)")
    if max_rel_error is not None and not cmp.max_rel <= max_rel_error:
        out.append(f"max relative error {cmp.max_rel:.6e} exceeds --max-rel-error {max_rel_error:g}")
    return out


def plot(cmp: Comparison, labels: tuple[str, str], key: str, path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6),
                                      gridspec_kw={"height_ratios": [2, 1]})
    top.plot(cmp.steps, cmp.a, label=labels[0])
    top.plot(cmp.steps, cmp.b, label=labels[1], linestyle="--")
    top.set_ylabel(key)
    top.legend()
    top.set_title(f"mean rel. error {cmp.mean_rel:.3e}, max {cmp.max_rel:.3e}")
    bottom.plot(cmp.steps, cmp.rel_err, label="relative error", color="C2")
    bottom.set_ylabel("relative error")
    bottom.set_xlabel("step")
    twin = bottom.twinx()
    twin.plot(cmp.steps, cmp.abs_err, label="absolute error", color="C3", alpha=0.7)
    twin.set_ylabel("absolute error")
    handles = bottom.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    bottom.legend(handles, ["relative error", "absolute error"], loc="upper right")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)  # keep the suffix: it picks the format
    try:
        fig.savefig(tmp)
        tmp.replace(path)
    except OSError as e:
        raise UserError(f"--plot {path}: cannot write the plot ({e.strerror or e})") from None
    except ValueError as e:  # matplotlib: an extension it has no writer for
        raise UserError(f"--plot {path}: {e}") from None
    finally:
        plt.close(fig)
        with contextlib.suppress(OSError):  # absent after the rename, or its folder is not one
            tmp.unlink()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.compare_loss", description=__doc__.split("\n")[0])
    parser.add_argument("a", help="metrics JSONL (ours)")
    parser.add_argument("b", help="metrics JSONL (the reference)")
    parser.add_argument("--key", default="loss", help="metric to compare (default: loss)")
    parser.add_argument("--plot", metavar="PNG", help="write the curves and errors to this image")
    parser.add_argument("--common-steps", action="store_true",
                        help="compare the steps both files log; others do not fail the comparison")
    parser.add_argument("--max-rel-error", type=float, metavar="X",
                        help="fail when the max relative error exceeds X")
    args = parser.parse_args(argv)
    if args.max_rel_error is not None and not args.max_rel_error >= 0:
        raise UserError(f"--max-rel-error {args.max_rel_error}: must be a number >= 0")
    names = (Path(args.a).name, Path(args.b).name)

    cmp = compare(read_metric(args.a, args.key), read_metric(args.b, args.key))
    finite = len(cmp.steps) - len(cmp.nonfinite)
    print(f"steps compared: {finite} ({cmp.steps[0]}..{cmp.steps[-1]})")
    print(f"mean relative error: {cmp.mean_rel:.6e}")
    print(f"max relative error:  {cmp.max_rel:.6e}")
    print(f"mean absolute error: {cmp.mean_abs:.6e}")
    print(f"max absolute error:  {cmp.max_abs:.6e}")
    if args.plot:
        plot(cmp, names, args.key, args.plot)
        print(f"plot written to {args.plot}")
    reasons = failures(cmp, names, args.common_steps, args.max_rel_error)
    for reason in reasons:
        print(f"FAILED: {reason}")
    return 1 if reasons else 0


if __name__ == "__main__":
    cli.run(main)
