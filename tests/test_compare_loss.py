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
        compare_loss.cli.run(compare_loss.main, [str(a), str(b), "--plot", str(png)])
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
    with pytest.raises(SystemExit) as exit_info:
        compare_loss.cli.run(compare_loss.main, [str(a), str(b)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
