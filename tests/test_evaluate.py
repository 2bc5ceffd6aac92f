"""runners.evaluate and parallel/score.py: outputs, batching, compilation, interruption, several
processes, bad input. (Scores against lm-eval itself: tests/test_evaluate_parity.py.)"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib import config as config_lib
from lib.errors import UserError
from lib.evals.tokens import Request
from lib.tokenizer import train_sentencepiece
from models import hf, llama
from parallel import score, sharding
from parallel.mesh import Mesh
from runners import evaluate

DATA = Path(__file__).parent / "data" / "evals"
ROOT = Path(__file__).resolve().parent.parent
MODEL = llama.Config(vocab_size=700, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                     max_seq_len=256)
TASKS = [f"eval.mmlu={DATA}/mmlu/data", f"eval.ceval={DATA}/ceval", f"eval.boolq={DATA}/boolq",
         f"eval.piqa={DATA}/piqa", f"eval.hellaswag={DATA}/hellaswag", f"eval.choice={DATA}/choice.jsonl",
         "eval.tasks=[mmlu,ceval,boolq,piqa,hellaswag,choice]"]
N_DOCS = 8 + 3 + 5 + 5 + 5 + 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model")
    hf.save(path, MODEL, llama.init(MODEL, seed=0))
    texts = [line for f in DATA.rglob("*") if f.is_file() for line in f.read_text().splitlines()]
    train_sentencepiece(texts * 20, 600, path / "tokenizer.model")
    return path


def _run(model_dir: Path, out: Path, *extra: str) -> list[dict]:
    evaluate.main([f"checkpoint.load={model_dir}", f"out_dir={out}", "eval.compile=false", *TASKS, *extra])
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_outputs_cover_every_document(model_dir, tmp_path, capsys):
    samples = _run(model_dir, tmp_path)
    assert len(samples) == N_DOCS
    first = samples[0]
    assert set(first) == {"task", "subject", "doc_index", "loglikelihoods", "prediction",
                          "prediction_norm", "target", "correct"}
    assert (first["task"], first["subject"], first["doc_index"]) == ("mmlu", "astronomy", 0)
    assert len(first["loglikelihoods"]) == 4 and all(ll < 0 for ll in first["loglikelihoods"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["results"]) == {"mmlu", "ceval", "boolq", "piqa", "hellaswag", "choice"}
    assert results["settings"]["num_fewshot"] is None and results["seconds"] > 0
    table = capsys.readouterr().out
    assert "mmlu_high_school_chemistry" in table and "macro average" in table


def test_batch_size_does_not_change_the_scores(model_dir, tmp_path):
    a = _run(model_dir, tmp_path / "a", "eval.batch_size=1", "eval.tasks=[mmlu,hellaswag]")
    b = _run(model_dir, tmp_path / "b", "eval.tokens_per_batch=200", "eval.tasks=[mmlu,hellaswag]")
    for x, y in zip(a, b, strict=True):
        assert x["loglikelihoods"] == pytest.approx(y["loglikelihoods"], abs=1e-5)


def test_interrupted_run_leaves_valid_lines(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "CHUNK_DOCS", 4)
    calls = {"n": 0}
    original = score.Scorer.__call__

    def interrupt_second_chunk(self, params, requests, progress=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, params, requests, progress)
    monkeypatch.setattr(score.Scorer, "__call__", interrupt_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        _run(model_dir, tmp_path)
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["task"] == "mmlu" for line in lines)


def test_scores_equal_a_plain_forward_per_request():
    params = llama.init(MODEL, seed=1)
    g = torch.Generator().manual_seed(0)
    requests = []
    for i in range(6):
        context = tuple(torch.randint(1, 700, (int(torch.randint(3, 280, (1,), generator=g)),), generator=g).tolist())
        for _ in range(3):
            requests.append(Request(context, tuple(torch.randint(1, 700, (1 + i % 3,), generator=g).tolist())))
    mesh = Mesh(None, {"data": 1, "fsdp": 1, "tensor": 1})
    results, truncated = score.Scorer(MODEL, mesh, sharding.load_rules(), tokens_per_batch=512)(params, requests)
    for i, req in enumerate(requests):
        whole = (req.context + req.continuation)[-(MODEL.max_seq_len + 1):]
        with torch.no_grad():
            logp = llama.forward(params, torch.tensor([whole[:-1]]), MODEL)[0].log_softmax(-1)
        n = len(req.continuation)
        positions = range(len(whole) - 1 - n, len(whole) - 1)
        expected = sum(float(logp[p, t]) for p, t in zip(positions, req.continuation))
        greedy = all(int(logp[p].argmax()) == t for p, t in zip(positions, req.continuation))
        assert results[i][0] == pytest.approx(expected, abs=1e-4) and results[i][1] == greedy
        assert (i in truncated) == (len(req.context) + n > MODEL.max_seq_len + 1)


def test_single_token_choices_share_one_row_and_buckets_are_few():
    requests = [Request((1, 2, 3), (c,)) for c in (10, 11, 12, 13)] + [Request((1, 2), (3, 4))]
    rows, _ = score.plan_rows(requests, max_len=16)
    # (1, 2) + (3, 4) has the same model input (1, 2, 3): one row for all five requests
    assert len(rows) == 1 and rows[0].tokens == (1, 2, 3)
    assert rows[0].targets == [10, 11, 12, 13, 3, 4] and rows[0].positions == [2, 2, 2, 2, 1, 2]
    assert [score.bucket(n) for n in (1, 16, 17, 20, 21, 33, 100, 1000)] == [16, 16, 20, 20, 24, 40, 112, 1024]
    assert score.entries_bucket(3) == 4 and score.entries_bucket(1) == 1


def test_shared_prefixes_run_once_and_score_like_whole_rows():
    """MMLU-like requests: per subject one description + shots, then a question, four single-token
    answers; plus HellaSwag-like ones: one context, four multi-token endings."""
    g = torch.Generator().manual_seed(2)
    rand = lambda n: tuple(torch.randint(3, 700, (n,), generator=g).tolist())
    requests = []
    for subject in range(3):
        shots = (1,) + rand(60 + 10 * subject)
        for _ in range(5):
            question = rand(int(torch.randint(5, 40, (1,), generator=g)))
            requests += [Request(shots + question, (c,)) for c in (10, 11, 12, 13)]
    for _ in range(4):
        context = (1,) + rand(45)
        requests += [Request(context, rand(int(torch.randint(2, 12, (1,), generator=g)))) for _ in range(4)]
    rows, _ = score.plan_rows(requests, MODEL.max_seq_len)
    groups, alone = score.group_by_prefix(rows)
    assert sorted(len(gr.rows) for gr in groups) == [4, 4, 4, 4, 5, 5, 5] and not alone
    assert sorted(len(gr.prefix) for gr in groups)[-3:] == [61, 71, 81]  # the shots, nothing more
    params = llama.init(MODEL, seed=1)
    mesh = Mesh(None, {"data": 1, "fsdp": 1, "tensor": 1})
    shared, _ = score.Scorer(MODEL, mesh, sharding.load_rules(), tokens_per_batch=256)(params, requests)
    whole, _ = score.Scorer(MODEL, mesh, sharding.load_rules(), share_prefixes=False)(params, requests)
    assert [r[0] for r in shared] == pytest.approx([r[0] for r in whole], abs=1e-4)
    assert [r[1] for r in shared] == [r[1] for r in whole]


def test_the_compiled_scorer_is_reused_across_batches():
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    counter = CompileCounter()
    params = llama.init(MODEL, seed=1)
    mesh = Mesh(None, {"data": 1, "fsdp": 1, "tensor": 1})
    scorer = score.Scorer(MODEL, mesh, sharding.load_rules(), backend=counter, rows_per_batch=2)
    requests = [Request(tuple(range(1, 10 + i)), (5,)) for i in range(9)]  # lengths 9..17
    results, _ = scorer(params, requests)
    rows, _ = score.plan_rows(requests, MODEL.max_seq_len)
    shapes = {b.shape for b in score.make_batches(rows, 0, 2)}
    # 5 batches of 2 shapes: the layer compiled once per shape, shared by every layer
    assert len(shapes) == 2 and counter.frame_count == len(shapes)
    eager, _ = score.Scorer(MODEL, mesh, sharding.load_rules(), rows_per_batch=2)(params, requests)
    assert [r[0] for r in results] == pytest.approx([r[0] for r in eager], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Several processes: documents split over data-parallel ranks, the model over tensor-parallel ones


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_fsdp_by_tensor_parallel_processes_score_what_one_does(model_dir, tmp_path):
    """4 processes: documents split over 2 FSDP shards, the model over 2 tensor-parallel ranks."""
    one = _run(model_dir, tmp_path / "one", "eval.tasks=[mmlu,hellaswag,boolq]")
    port = _free_port()
    procs = []
    for rank in range(4):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="4", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "runners.evaluate", f"checkpoint.load={model_dir}", f"out_dir={tmp_path / 'two'}",
             "eval.compile=false", "eval.tokens_per_batch=300", *TASKS, "eval.tasks=[mmlu,hellaswag,boolq]",
             "mesh.fsdp=2", "mesh.tensor=2"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[-1][-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "samples.jsonl").read_text().splitlines()]
    for a, b in zip(one, two, strict=True):
        assert (a["task"], a["subject"], a["doc_index"]) == (b["task"], b["subject"], b["doc_index"])
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_a_tokenizer_larger_than_the_model_vocabulary(model_dir, tmp_path):
    big = train_sentencepiece([l for f in DATA.rglob("*") if f.is_file() for l in f.read_text().splitlines()] * 50,
                              800, tmp_path / "big.model")
    with pytest.raises(UserError, match="the tokenizer has 800 tokens but the model.s vocabulary is 700"):
        _run(model_dir, tmp_path / "out", f"data.tokenizer={big}")


def test_a_task_without_its_files(model_dir, tmp_path):
    with pytest.raises(UserError, match="eval.tasks includes piqa: set eval.piqa="):
        evaluate.main([f"checkpoint.load={model_dir}", "eval.tasks=[piqa]", f"out_dir={tmp_path}"])


def test_unknown_task_in_the_config():
    with pytest.raises(config_lib.ConfigError, match="unknown task 'mmlu_pro'; known tasks: mmlu, ceval"):
        config_lib.parse_argv(evaluate.EvaluateConfig, ["eval.tasks=[mmlu_pro]"])


def test_no_model_given(tmp_path):
    with pytest.raises(UserError, match="set checkpoint.load="):
        evaluate.main([f"out_dir={tmp_path}"])


def test_a_native_checkpoint_scores_like_its_hf_directory(model_dir, tmp_path):
    from runners import convert
    convert.hf_to_native(model_dir, tmp_path / "native", None)
    hf_run = _run(model_dir, tmp_path / "hf", "eval.tasks=[boolq]")
    native_run = _run(tmp_path / "native", tmp_path / "out", "eval.tasks=[boolq]")  # tokenizer found via its origin
    assert [s["loglikelihoods"] for s in native_run] == [s["loglikelihoods"] for s in hf_run]


def test_generate_method_answers_with_the_first_letter_of_greedy_text(model_dir, tmp_path):
    """ModelLink's way: the text is transformers' greedy continuation of the same prompt."""
    transformers = pytest.importorskip("transformers")
    samples = _run(model_dir, tmp_path, "eval.method=generate", "eval.tasks=[mmlu,ceval]",
                   "eval.max_new_tokens=3", "eval.limit=2")
    assert len(samples) == 2 * 2 + 2 and all("generated" in s and "loglikelihoods" not in s for s in samples)
    from lib.evals import load_docs
    from lib.evals.doc import Answered
    from lib.tokenizer import load_tokenizer
    tok = load_tokenizer(model_dir / "tokenizer.model")
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    docs = load_docs("mmlu", DATA / "mmlu" / "data", limit=2)
    for doc, sample in zip(docs, samples):
        ids = torch.tensor([tok.encode(doc.context, bos=True)[-(MODEL.max_seq_len - 3):]])  # left-truncated
        out = reference.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=tok.eos_id)
        text = tok.decode([t for t in out[0, ids.shape[1]:].tolist() if t != tok.eos_id])
        assert sample["generated"] == text
        assert sample["prediction"] == Answered(doc, text).prediction


def test_generate_method_is_for_lettered_exams():
    with pytest.raises(config_lib.ConfigError, match="method=generate answers lettered exams"):
        config_lib.parse_argv(evaluate.EvaluateConfig, ["eval.method=generate", "eval.tasks=[mmlu,boolq]"])
