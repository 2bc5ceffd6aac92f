"""runners.evaluate against lm-evaluation-harness 0.4 itself (test-only reference), question by
question: the same random-weight model, the same data written in each dataset's original layout
for us and in its Hugging Face dataset layout for lm-eval, lm-eval's own task definitions
(mmlu_<subject>, ceval-valid_<subject>, boolq, piqa, hellaswag) with only the data source
replaced. Every document's log-likelihoods within 1e-4 and identical predictions.

Two families and two tokenizers: LLaMA-2-style GQA with a sentencepiece model trained here, and
LLaMA-3-style with a byte-level BPE tokenizer.json; the second model's context is short, so
5-shot MMLU prompts are truncated on the left as HFLM truncates them.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import random

import pytest
import torch

from lib.tokenizer import train_sentencepiece
from models import llama
from runners import evaluate
from tests.helpers_hf import random_hf_model

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

WORDS = ("the a cell heart river law court market price energy atom light water stone tree "
         "king city ship road war peace theory number prime graph field force mass time space "
         "gene virus trade tax vote poem novel song paint bridge engine wheel").split()
CEVAL_WORDS = "法律 经济 物理 化学 历史 地理 数学 生物 文学 艺术 医学 工程".split()


def _sentence(rng: random.Random, words=WORDS, n=(4, 12)) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(*n)))


def _write_csv(path, rows, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def write_tasks(root, seed: int) -> dict:
    """Task files in the original layouts (ours) and HF dataset layouts (lm-eval's loaders).
    Returns lm-eval's data_files per task name."""
    rng = random.Random(seed)
    theirs = root / "hf"
    hf_files: dict[str, dict[str, str]] = {}
    letters = "ABCD"
    for subject in ("anatomy", "high_school_physics"):
        splits = {}
        for split, n in (("dev", 5), ("test", 6)):
            rows = [(_sentence(rng) + ("  " if i == 1 else ""),  # a question needing .strip()
                     *[_sentence(rng, n=(1, 3)) for _ in range(4)], rng.choice(letters))
                    for i in range(n)]
            _write_csv(root / "mmlu" / "data" / split / f"{subject}_{split}.csv", rows)
            splits[split] = [{"question": r[0], "subject": subject, "choices": list(r[1:5]),
                              "answer": letters.index(r[5])} for r in rows]
            (theirs / f"mmlu_{subject}_{split}.json").parent.mkdir(parents=True, exist_ok=True)
            (theirs / f"mmlu_{subject}_{split}.json").write_text(json.dumps(splits[split]))
        hf_files[f"mmlu_{subject}"] = {s: str(theirs / f"mmlu_{subject}_{s}.json") for s in splits}

    ceval = {}
    for split, n in (("dev", 5), ("val", 5)):
        rows = [(i, _sentence(rng, CEVAL_WORDS), *[_sentence(rng, CEVAL_WORDS, (1, 2)) for _ in range(4)],
                 rng.choice(letters), "解析") for i in range(n)]
        header = ["id", "question", "A", "B", "C", "D", "answer"] + (["explanation"] if split == "dev" else [])
        _write_csv(root / "ceval" / split / f"law_{split}.csv",
                   [r if split == "dev" else r[:-1] for r in rows], header)
        ceval[split] = [dict(zip(header, r)) for r in rows]
        (theirs / f"ceval_{split}.json").write_text(json.dumps(ceval[split], ensure_ascii=False))
    hf_files["ceval-valid_law"] = {s: str(theirs / f"ceval_{s}.json") for s in ceval}

    boolq = [{"question": _sentence(rng), "title": "t", "answer": rng.random() < 0.5,
              "passage": _sentence(rng, n=(20, 40))} for _ in range(8)]
    _write_jsonl(root / "boolq" / "dev.jsonl", boolq)
    _write_jsonl(theirs / "boolq.jsonl", [{"question": r["question"], "passage": r["passage"],
                                            "idx": i, "label": int(r["answer"])} for i, r in enumerate(boolq)])
    hf_files["boolq"] = {"train": str(theirs / "boolq.jsonl"), "validation": str(theirs / "boolq.jsonl")}

    piqa = [{"goal": _sentence(rng), "sol1": _sentence(rng), "sol2": _sentence(rng, n=(2, 20))} for _ in range(8)]
    labels = [rng.randint(0, 1) for _ in piqa]
    _write_jsonl(root / "piqa" / "valid.jsonl", piqa)
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{x}\n" for x in labels))
    _write_jsonl(theirs / "piqa.jsonl", [{**r, "label": x} for r, x in zip(piqa, labels)])
    hf_files["piqa"] = {"train": str(theirs / "piqa.jsonl"), "validation": str(theirs / "piqa.jsonl")}

    hellaswag = [{"ind": i, "activity_label": "Making a " + rng.choice(WORDS),
                  "ctx_a": _sentence(rng) + " [title] " + _sentence(rng), "ctx_b": "Then " + _sentence(rng, n=(1, 3)),
                  "endings": [_sentence(rng) + (" [step]" if j == 0 else "") for j in range(4)],
                  "label": str(rng.randint(0, 3))} for i in range(8)]
    _write_jsonl(root / "hellaswag" / "hellaswag_val.jsonl", hellaswag)
    _write_jsonl(theirs / "hellaswag.jsonl", hellaswag)
    hf_files["hellaswag"] = {"train": str(theirs / "hellaswag.jsonl"), "validation": str(theirs / "hellaswag.jsonl")}
    return hf_files


def _byte_bpe_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                eos_token="<|end_of_text|>")


FAMILIES = {
    # (model config, tokenizer kind)
    "llama2-sentencepiece": (dataclasses.replace(llama.PRESETS["tiny"], vocab_size=380, max_seq_len=512), "sentencepiece"),
    "llama3-tokenizer-json": (dataclasses.replace(llama.PRESETS["tiny-llama3"], vocab_size=600, max_seq_len=160), "bpe"),
}
LM_EVAL_TASKS = ["mmlu_anatomy", "mmlu_high_school_physics", "ceval-valid_law", "boolq", "piqa", "hellaswag"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def both_runs(request, tmp_path_factory):
    """(our samples by (task, subject, index), lm-eval's samples by the same key, our results)."""
    config, tok_kind = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf_files = write_tasks(root / "tasks", seed=len(request.param))
    rng = random.Random(0)
    texts = [_sentence(rng, WORDS + CEVAL_WORDS, (5, 30)) for _ in range(3000)]
    model_dir = root / "model"
    random_hf_model(config).save_pretrained(model_dir)
    if tok_kind == "sentencepiece":
        # A LLaMA-2-style directory: tokenizer.model and the tokenizer_config.json beside it.
        train_sentencepiece(texts, config.vocab_size, model_dir / "tokenizer.model")
        (model_dir / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))
        hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    else:
        hf_tok = _byte_bpe_tokenizer(texts, config.vocab_size)
        hf_tok.save_pretrained(model_dir)
    assert len(hf_tok) <= config.vocab_size

    out = root / "ours"
    evaluate.main([f"checkpoint.load={model_dir}", f"out_dir={out}", "eval.compile=false",
                   "eval.tasks=[mmlu,ceval,boolq,piqa,hellaswag]", "eval.tokens_per_batch=1024",
                   f"eval.mmlu={root}/tasks/mmlu/data", f"eval.ceval={root}/tasks/ceval",
                   f"eval.boolq={root}/tasks/boolq/dev.jsonl", f"eval.piqa={root}/tasks/piqa",
                   f"eval.hellaswag={root}/tasks/hellaswag/hellaswag_val.jsonl"])
    ours = {}
    for line in (out / "samples.jsonl").read_text().splitlines():
        s = json.loads(line)
        ours[(s["task"], s["subject"], s["doc_index"])] = s

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    manager = TaskManager()
    # lm-eval's own task definitions; only the data source (and MMLU/C-Eval's 5 shots) set here
    tasks = [manager._factory.build(manager._entry(name), registry=manager._index, overrides={
        "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": hf_files[name]},
        "num_fewshot": 5 if name.startswith(("mmlu", "ceval")) else 0})
        for name in LM_EVAL_TASKS]
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    run = lm_eval.simple_evaluate(model=HFLM(pretrained=reference, tokenizer=hf_tok, batch_size=8),
                                  tasks=tasks, log_samples=True, verbosity="ERROR")
    theirs = {}
    for name in LM_EVAL_TASKS:
        ours_task, subject = (("mmlu", name[5:]) if name.startswith("mmlu_") else
                              ("ceval", name.split("_", 1)[1]) if name.startswith("ceval") else (name, None))
        for s in run["samples"][name]:
            theirs[(ours_task, subject, s["doc_id"])] = s
    return ours, theirs, json.loads((out / "results.json").read_text())


def test_every_document_scores_as_in_lm_eval(both_runs):
    ours, theirs, _ = both_runs
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 6 + 5 + 3 * 8
    for key, ref in theirs.items():
        mine = ours[key]
        lls = [r[0] for r in ref["filtered_resps"]]
        assert mine["loglikelihoods"] == pytest.approx(lls, abs=1e-4), key
        assert mine["target"] == int(ref["target"]), key
        assert float(mine["correct"]) == ref["acc"], key
        if "acc_norm" in ref:
            assert float(mine["prediction_norm"] == mine["target"]) == ref["acc_norm"], key


def test_results_json_has_the_tables(both_runs):
    ours, _, results = both_runs
    mmlu = results["results"]["mmlu"]
    assert mmlu["n"] == 12 and set(mmlu["subjects"]) == {"anatomy", "high_school_physics"}
    assert set(mmlu["categories"]) == {"stem"}
    assert mmlu["acc"] == pytest.approx(sum(s["correct"] for k, s in ours.items() if k[0] == "mmlu") / 12)
    assert "acc_norm" in results["results"]["hellaswag"] and "acc_norm" not in results["results"]["boolq"]
    # the LLaMA-3-style model's 160-token context cuts the 5-shot prompts: HFLM's truncation matched
    assert (results["truncated_contexts"] > 0) == (results["model"]["config"]["max_seq_len"] == 160)
