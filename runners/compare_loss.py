"""Compare two loss curves (metrics JSONL files), as loss-parity reports do.

    python -m runners.compare_loss ours.jsonl reference.jsonl --plot parity.png [--key loss]

Each file holds one JSON object per line with "step" and the compared key. The curves are
aligned on the steps both files share; relative error is |a - b| / |b| (b is the reference).
Prints the mean and max relative and absolute errors; the plot shows both curves above and
both errors below.
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lib import cli
from lib.errors import UserError


def read_metric(path: str | Path, key: str) -> dict[int, float]:
    """{step: value} for every line of a JSONL file that has `key` (lines without it are skipped,
    so a log mixing train and validation records still works)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    values: dict[int, float] = {}
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
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
                values[int(record["step"])] = float(record[key])
            except (TypeError, ValueError):
                raise UserError(f"{path}:{lineno}: step {record['step']!r} / {key} {record[key]!r} "
                                "are not numbers") from None
    if not values:
        raise UserError(f"{path}: no record has the key {key!r}")
    return values


@dataclass(frozen=True)
class Comparison:
    steps: list[int]
    a: list[float]
    b: list[float]
    abs_err: list[float]
    rel_err: list[float]

    @property
    def mean_abs(self) -> float:
        return sum(self.abs_err) / len(self.abs_err)

    @property
    def max_abs(self) -> float:
        return max(self.abs_err)

    @property
    def mean_rel(self) -> float:
        return sum(self.rel_err) / len(self.rel_err)

    @property
    def max_rel(self) -> float:
        return max(self.rel_err)


def compare(a: dict[int, float], b: dict[int, float]) -> Comparison:
    """Align two {step: value} curves on their common steps; b is the reference."""
    steps = sorted(set(a) & set(b))
    if not steps:
        raise UserError(f"the files share no step (first: steps {min(a)}..{max(a)}, "
                        f"second: steps {min(b)}..{max(b)})")
    av, bv = [a[s] for s in steps], [b[s] for s in steps]
    abs_err = [abs(x - y) for x, y in zip(av, bv)]
    rel_err = [e / abs(y) if y != 0 else (0.0 if e == 0 else math.inf) for e, y in zip(abs_err, bv)]
    return Comparison(steps, av, bv, abs_err, rel_err)


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
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.compare_loss", description=__doc__.split("\n")[0])
    parser.add_argument("a", help="metrics JSONL (ours)")
    parser.add_argument("b", help="metrics JSONL (the reference)")
    parser.add_argument("--key", default="loss", help="metric to compare (default: loss)")
    parser.add_argument("--plot", metavar="PNG", help="write the curves and errors to this image")
    args = parser.parse_args(argv)

    cmp = compare(read_metric(args.a, args.key), read_metric(args.b, args.key))
    print(f"steps compared: {len(cmp.steps)} ({cmp.steps[0]}..{cmp.steps[-1]})")
    print(f"mean relative error: {cmp.mean_rel:.6e}")
    print(f"max relative error:  {cmp.max_rel:.6e}")
    print(f"mean absolute error: {cmp.mean_abs:.6e}")
    print(f"max absolute error:  {cmp.max_abs:.6e}")
    if args.plot:
        if not Path(args.plot).parent.is_dir():
            raise UserError(f"--plot {args.plot}: directory {Path(args.plot).parent} does not exist")
        plot(cmp, (Path(args.a).name, Path(args.b).name), args.key, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    cli.run(main)
