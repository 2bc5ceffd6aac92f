import json

import pytest

from runners import compare_loss


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_numbers_on_hand_made_files(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [
        {"step": 1, "loss": 2.2}, {"step": 2, "loss": 1.5},
        {"step": 2, "val_loss": 9.0},            # another record kind: skipped
        {"step": 3, "loss": 1.0}, {"step": 4, "loss": 7.0}])  # step 4 is only here
    b = write_jsonl(tmp_path / "b.jsonl", [
        {"step": 0, "loss": 3.0}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5},
        {"step": 3, "loss": 0.8}])
    png = tmp_path / "parity.png"
    with pytest.raises(SystemExit) as exit_info:
        compare_loss.cli.run(compare_loss.main, [str(a), str(b), "--plot", str(png), "--common-steps"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    # Steps 1..3 are shared; abs errors 0.2, 0, 0.2; rel errors 0.1, 0, 0.25 (b is the reference).
    assert "steps compared: 3 (1..3)" in out
    assert "mean relative error: 1.166667e-01" in out
    assert "max relative error:  2.500000e-01" in out
    assert "mean absolute error: 1.333333e-01" in out
    assert "max absolute error:  2.000000e-01" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))


def test_other_key(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"step": 5, "grad_norm": 2.0}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"step": 5, "grad_norm": 4.0}])
    cmp = compare_loss.compare(compare_loss.read_metric(a, "grad_norm"),
                               compare_loss.read_metric(b, "grad_norm"))
    assert cmp.rel_err == [0.5] and cmp.abs_err == [2.0]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("no_key", "no record has the key 'loss'"),
    ("no_overlap", "share no step"),
    ("bad_json", "a.jsonl:2: not valid JSON"),
    ("no_step", "has 'loss' but no 'step'"),
    ("binary", "a.jsonl:1: not UTF-8 text (a binary file, not a metrics JSONL?)"),
    ("repeated_step", "a.jsonl:3: step 1 already has a 'loss' on line 1"),
])
def test_clear_errors(tmp_path, capsys, case, message):
    b = write_jsonl(tmp_path / "b.jsonl", [{"step": 1, "loss": 1.0}])
    a = tmp_path / "a.jsonl"
    if case == "no_key":
        write_jsonl(a, [{"step": 1, "lr": 0.1}])
    elif case == "no_overlap":
        write_jsonl(a, [{"step": 7, "loss": 1.0}])
    elif case == "bad_json":
        a.write_text('{"step": 1, "loss": 1.0}\n{"step": 2,\n')
    elif case == "no_step":
        write_jsonl(a, [{"loss": 1.0}])
    elif case == "repeated_step":
        write_jsonl(a, [{"step": 1, "loss": 1.0}, {"step": 1, "val_loss": 2.0}, {"step": 1, "loss": 0.5}])
    elif case == "binary":
        a.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    with pytest.raises(SystemExit) as exit_info:
        compare_loss.cli.run(compare_loss.main, [str(a), str(b)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def run(argv) -> int:
    with pytest.raises(SystemExit) as exit_info:
        compare_loss.cli.run(compare_loss.main, [str(x) for x in argv])
    return exit_info.value.code


def test_steps_that_do_not_line_up_fail(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [{"step": s, "loss": 1.0} for s in (1, 2, 3, 4, 5, 6, 7, 8)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"step": s, "loss": 1.0} for s in (0, 1, 2, 3)])
    assert run([a, b]) == 1
    out = capsys.readouterr().out
    assert "steps compared: 3 (1..3)" in out
    assert "FAILED: 5 steps (4, 5, 6, 7, 8) only in a.jsonl" in out
    assert "FAILED: 1 step (0) only in b.jsonl" in out
    assert run([a, b, "--common-steps"]) == 0  # runs logged at other intervals, on purpose


@pytest.mark.parametrize("bad_step", [1, 3])  # first or last: max() skips a NaN in some positions
@pytest.mark.parametrize("bad_value", ["nan", float("inf")])  # as MetricsLogger writes NaN; JSON's Infinity
def test_nonfinite_values_fail(tmp_path, capsys, bad_step, bad_value):
    losses = {1: 2.0, 2: 1.5, 3: 1.0}
    a = tmp_path / "a.jsonl"
    write_jsonl(a, [{"step": s, "loss": bad_value if s == bad_step else v} for s, v in losses.items()])
    b = write_jsonl(tmp_path / "b.jsonl", [{"step": s, "loss": v * 1.1} for s, v in losses.items()])
    assert run([a, b]) == 1
    out = capsys.readouterr().out
    assert "steps compared: 2 (1..3)" in out                   # the finite ones
    assert "max relative error:  9.090909e-02" in out          # 0.1 / 1.1, not 0 and not nan
    assert f"FAILED: non-finite values at 1 step ({bad_step}); first: step {bad_step} {float(bad_value)} (a.jsonl)" in out


def test_reference_nonfinite_and_tolerance(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.1}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0}])
    assert run([a, b, "--max-rel-error", "0.2"]) == 0
    assert run([a, b, "--max-rel-error", "0.05"]) == 1
    assert "FAILED: max relative error 1.000000e-01 exceeds --max-rel-error 0.05" in capsys.readouterr().out
    nan_ref = write_jsonl(tmp_path / "c.jsonl", [{"step": 1, "loss": float("nan")}])
    assert run([tmp_path / "a.jsonl", nan_ref, "--common-steps"]) == 1
    out = capsys.readouterr().out
    assert "steps compared: 0" in out and "max relative error:  nan" in out
    assert "first: step 1 1.0 (a.jsonl) vs nan (c.jsonl)" in out


@pytest.mark.parametrize("where, message", [
    ("missing/parity.png", "No such file or directory"),
    ("a.jsonl/parity.png", "Not a directory"),            # a file where a folder should be
    ("parity.xyz", "Format 'xyz' is not supported"),
])
def test_unwritable_plot_path(tmp_path, capsys, where, message):
    a = write_jsonl(tmp_path / "a.jsonl", [{"step": 1, "loss": 1.0}])
    assert run([a, a, "--plot", tmp_path / where]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --plot {tmp_path / where}: ") and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]  # no temporary left
