"""runners.preprocess end to end: worker-count invariance, handlers, and every kind of bad input."""
import errno
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lib import cli
from lib.data import indexed
from lib.data.corpus import procedural_documents
from lib.data.indexed import IndexedDataset
from lib.errors import UserError
from lib.tokenizer import load_tokenizer, train_sentencepiece
from runners.preprocess import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return train_sentencepiece(list(procedural_documents(50_000)), 400, tmp_path_factory.mktemp("tok") / "tok.model")


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _run(*args):
    return main([str(a) for a in args])


def test_two_workers_equal_one(tmp_path, tok_path):
    docs = list(procedural_documents(40_000, seed=1))
    inp = tmp_path / "in"
    inp.mkdir()
    _jsonl(inp / "a.jsonl", [{"text": d, "other": d[:20]} for d in docs[:30]])
    _jsonl(inp / "b.jsonl", [{"text": d, "other": d[:20]} for d in docs[30:]])
    for w in (1, 2):
        _run("--input", inp, "--output-prefix", tmp_path / f"w{w}", "--tokenizer", tok_path,
             "--json-keys", "text", "other", "--append-eod", "--workers", w)
    for key in ("text", "other"):
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"w1_{key}_document{ext}").read_bytes() == (tmp_path / f"w2_{key}_document{ext}").read_bytes()
    ds = IndexedDataset(tmp_path / "w1_text_document")
    tok = load_tokenizer(tok_path)
    assert ds.num_documents == len(docs)
    assert list(ds[31]) == tok.encode(docs[31], bos=True, eos=True)  # files in name order, bos + text + eos


def test_txt_csv_parquet_inputs(tmp_path, tok_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first doc\nstill first\n\nsecond doc\n")
    (tmp_path / "b.csv").write_text("text,x\nthird doc,1\n")
    pq.write_table(pa.table({"text": ["fourth doc"]}), tmp_path / "c.parquet")
    _run("--input", tmp_path, "--output-prefix", tmp_path / "out" / "mix", "--tokenizer", tok_path)
    ds = IndexedDataset(tmp_path / "out" / "mix_text_document")
    tok = load_tokenizer(tok_path)
    assert [tok.decode(ds[i]) for i in range(4)] == ["first doc\nstill first", "second doc", "third doc", "fourth doc"]


def test_alpaca_handler_masks_prompt(tmp_path, tok_path):
    recs = [{"instruction": f"Say {i}", "input": "" if i % 2 else "ctx", "output": f"Said {i}."} for i in range(9)]
    _jsonl(tmp_path / "alpaca.jsonl", recs)
    _run("--input", tmp_path / "alpaca.jsonl", "--output-prefix", tmp_path / "sft", "--tokenizer", tok_path,
         "--handler", "alpaca", "--seq-length", 1024, "--pack")
    ids, mask = IndexedDataset(tmp_path / "sft_input_ids_document"), IndexedDataset(tmp_path / "sft_loss_mask_document")
    assert mask.dtype == np.uint8 and len(ids) == 9 and ids.num_documents < 9  # packed
    tok = load_tokenizer(tok_path)
    for i in range(9):
        trained = [t for t, m in zip(ids[i], mask[i]) if m]
        assert trained[-1] == tok.eos_id and tok.decode(trained[:-1]).strip() == f"Said {i}."
        assert sum(ids.sequence_lengths[ids.document_indices[d]:ids.document_indices[d + 1]].sum() <= 1024
                   for d in range(ids.num_documents)) == ids.num_documents


def test_sharegpt_and_moss_handlers(tmp_path, tok_path):
    _jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
                                                     {"from": "human", "value": "bye"}, {"from": "gpt", "value": "ok"}]}])
    _run("--input", tmp_path / "s.jsonl", "--output-prefix", tmp_path / "s", "--tokenizer", tok_path,
         "--handler", "sharegpt", "--template", "llama2-chat")
    tok = load_tokenizer(tok_path)
    ids, mask = IndexedDataset(tmp_path / "s_input_ids_document")[0], IndexedDataset(tmp_path / "s_loss_mask_document")[0]
    assert tok.decode([t for t, m in zip(ids, mask) if m and t != tok.eos_id]).split() == ["yo", "ok"]
    _jsonl(tmp_path / "m.jsonl", [{"meta_instruction": "You are MOSS.", "chat": {
        "turn_2": {"Human": "<|Human|>: b<eoh>\n", "MOSS": "<|MOSS|>: B<eom>\n"},
        "turn_1": {"Human": "<|Human|>: a<eoh>\n", "MOSS": "<|MOSS|>: A<eom>\n"}}}])
    _run("--input", tmp_path / "m.jsonl", "--output-prefix", tmp_path / "m", "--tokenizer", tok_path, "--handler", "moss")
    ids, mask = IndexedDataset(tmp_path / "m_input_ids_document")[0], IndexedDataset(tmp_path / "m_loss_mask_document")[0]
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert "A<eom>" in trained and "B<eom>" in trained and "Human" not in trained
    assert trained.index("A<eom>") < trained.index("B<eom>")  # turns in numeric order


def _bad_input(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "good one"}\n{"text": broken\n{"text": "\xff\xfe"}\n\xff\xfe\n{"nokey": 1}\n'
                  b'{"text": "   "}\n{"text": "good two"}\n')
    return p


def test_bad_lines_fail_with_file_and_line(tmp_path, tok_path):
    p = _bad_input(tmp_path)
    with pytest.raises(UserError, match=r"bad\.jsonl:2: invalid JSON"):
        _run("--input", p, "--output-prefix", tmp_path / "o", "--tokenizer", tok_path)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # nothing half-written


def test_bad_lines_skipped_and_counted(tmp_path, tok_path, capsys):
    p = _bad_input(tmp_path)
    _run("--input", p, "--output-prefix", tmp_path / "o", "--tokenizer", tok_path, "--on-bad-line", "skip")
    captured = capsys.readouterr()
    err = captured.err
    assert "bad.jsonl:2: invalid JSON" in err and "bad.jsonl:3: not UTF-8" in err and "bad.jsonl:4: not UTF-8" in err
    assert "bad.jsonl:5: missing key 'text'" in err
    assert IndexedDataset(tmp_path / "o_text_document").num_documents == 2
    assert "skipped 4 bad lines, 1 empty documents" in captured.out


def test_key_map_renames_fields(tmp_path, tok_path):
    _jsonl(tmp_path / "q.jsonl", [{"question": "Why?", "answer": "Because."}])
    _run("--input", tmp_path / "q.jsonl", "--output-prefix", tmp_path / "q", "--tokenizer", tok_path,
         "--handler", "alpaca", "--map", "instruction=question", "output=answer")
    tok = load_tokenizer(tok_path)
    ids, mask = IndexedDataset(tmp_path / "q_input_ids_document")[0], IndexedDataset(tmp_path / "q_loss_mask_document")[0]
    assert tok.decode([t for t, m in zip(ids, mask) if m and t != tok.eos_id]) == "Because."
    assert "Why?" in tok.decode(ids)
    with pytest.raises(UserError, match="expected KEY=FIELD"):
        _run("--input", tmp_path / "q.jsonl", "--output-prefix", tmp_path / "q", "--tokenizer", tok_path, "--map", "x")


def test_missing_instruction_key(tmp_path, tok_path):
    _jsonl(tmp_path / "a.jsonl", [{"output": "x"}])
    with pytest.raises(UserError, match=r"a\.jsonl:1: missing key 'instruction'"):
        _run("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "x", "--tokenizer", tok_path,
             "--handler", "alpaca")


def test_prompt_longer_than_seq_length(tmp_path, tok_path):
    _jsonl(tmp_path / "a.jsonl", [{"instruction": "long " * 50, "output": "x"}])
    with pytest.raises(UserError, match=r"a\.jsonl:1: the prompt alone fills --seq-length 16"):
        _run("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "x", "--tokenizer", tok_path,
             "--handler", "alpaca", "--seq-length", 16)


def test_empty_and_invalid_invocations(tmp_path, tok_path):
    _jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": " "}])
    with pytest.raises(UserError, match="no documents to write"):
        _run("--input", tmp_path / "e.jsonl", "--output-prefix", tmp_path / "o", "--tokenizer", tok_path)
    assert not list(tmp_path.glob("o*"))
    with pytest.raises(UserError, match="no such file"):
        _run("--input", tmp_path / "missing", "--output-prefix", tmp_path / "o", "--tokenizer", tok_path)
    with pytest.raises(UserError, match="--pack needs --seq-length"):
        _run("--input", tmp_path / "e.jsonl", "--output-prefix", tmp_path / "o", "--tokenizer", tok_path,
             "--handler", "alpaca", "--pack")
    with pytest.raises(UserError, match="tokenizer file not found"):
        _run("--input", tmp_path / "e.jsonl", "--output-prefix", tmp_path / "o", "--tokenizer", tmp_path / "no.model")


# ---------------------------------------------------------------------------------------------
# Faults: a full disk, a killed run's leftovers, a garbage parquet file


class FullDisk:
    """`open` for lib.data.indexed whose files (those ending in `suffix`) share `budget` bytes,
    then fail with ENOSPC, as a full disk does: on write, and again when close() flushes."""

    def __init__(self, budget, suffix=""):
        self.budget, self.suffix = budget, suffix

    def __call__(self, path, mode="r", *a, **kw):
        real = open(path, mode, *a, **kw)
        if "w" not in mode or not str(path).endswith(self.suffix):
            return real
        disk = self

        class File:
            def write(self, data):
                if len(data) > disk.budget:
                    disk.budget = 0
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                disk.budget -= len(data)
                return real.write(data)

            def close(self):
                real.close()
                if disk.budget == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __getattr__(self, name):
                return getattr(real, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.close()
        return File()


@pytest.mark.parametrize("disk", [FullDisk(3000), FullDisk(500, ".idx")],
                         ids=["while writing tokens", "while writing the second index"])
def test_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path, tok_path, capsys, monkeypatch, disk):
    docs = list(procedural_documents(20_000, seed=3))
    _jsonl(tmp_path / "in.jsonl", [{"instruction": d[:40], "output": d[40:200]} for d in docs])
    monkeypatch.setattr(indexed, "open", disk, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, [str(a) for a in ("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "o",
                                        "--tokenizer", tok_path, "--handler", "alpaca")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert re.fullmatch(rf"error: {tmp_path}/o_(input_ids|loss_mask)_document\.bin: cannot write it "
                        r"\(No space left on device\); no partial file is left", err)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]  # no output, no temporary, of either dataset


def test_killed_runs_temporaries_are_removed_live_ones_kept(tmp_path, tok_path, capsys):
    _jsonl(tmp_path / "in.jsonl", [{"text": "one document"}])
    prefix = tmp_path / "o_text_document"
    # A writer of the same prefix in another process, alive until told otherwise.
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from lib.data.indexed import IndexedDatasetWriter
        w = IndexedDatasetWriter({str(prefix)!r}, "uint16")
        w.add_document([1, 2, 3])
        print("writing", flush=True)
        sys.stdin.read()
        """)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        live = f"{prefix}.tmp{writer.pid}.bin"
        (tmp_path / "o_text_document.tmp99999999.bin").write_bytes(b"\0" * 10)   # killed earlier
        (tmp_path / "o_text_document.tmp99999999.idx").write_bytes(b"MMIDIDX")
        (tmp_path / "o_text_document.tmp88888888.idx").write_bytes(b"MMIDIDX")  # killed between renames
        (tmp_path / "o_text_document_v2.tmp77777777.bin").write_bytes(b"")        # another prefix
        (tmp_path / "o_text_document.tmpx.bin").write_bytes(b"")                   # not a writer's name
        _run("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "o", "--tokenizer", tok_path)
        err = capsys.readouterr().err
        assert (f"removed 3 temporary file(s) of an interrupted run: {prefix}.tmp88888888.idx, "
                f"{prefix}.tmp99999999.bin, {prefix}.tmp99999999.idx") in err
        assert sorted(os.listdir(tmp_path)) == sorted([
            "in.jsonl", "o_text_document.bin", "o_text_document.idx", os.path.basename(live),
            "o_text_document_v2.tmp77777777.bin", "o_text_document.tmpx.bin"])
        writer.kill()  # SIGKILL: no clean-up of its own
        writer.wait()
        _run("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "o", "--tokenizer", tok_path)
        assert f"removed 1 temporary file(s) of an interrupted run: {live}" in capsys.readouterr().err
        assert not os.path.exists(live)
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.parametrize("content", ["garbage", "cut in half"])
def test_garbage_parquet_names_the_file(tmp_path, tok_path, content):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "in.parquet"
    if content == "garbage":
        path.write_bytes(b"PAR1 this is not a parquet file at all\n" * 4)
    else:
        pq.write_table(pa.table({"text": [f"document {i}" for i in range(100)]}), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match=rf"^{path}: not a readable parquet file \(.+\)$"):
        _run("--input", path, "--output-prefix", tmp_path / "o", "--tokenizer", tok_path)
    assert sorted(os.listdir(tmp_path)) == ["in.parquet"]
