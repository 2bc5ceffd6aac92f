"""Evaluation throughput: runners.evaluate against lm-eval 0.4's HFLM, same model, same files.

    .venv/bin/python bench/evaluate.py                         # preset small, MMLU 5-shot + HellaSwag
    .venv/bin/python bench/evaluate.py --preset tiny --docs 20 # a quick look

The model is a random-weight LLaMA of the preset's shape saved as an HF directory with a
sentencepiece tokenizer trained on the generated default corpus; the task files are synthetic
(sentences of that corpus) with the lengths of the real ones: MMLU questions of ~60 tokens and
5-shot prompts of ~500, HellaSwag contexts of ~50 tokens and endings of ~25. lm-eval scores them
through its own task definitions with only the data source replaced (as tests/test_evaluate_parity
does), at batch size 1 (its default) and at --hf-batch. Reported: documents/s for each, and the
largest |log-likelihood difference| between the two tools over every choice (a correctness check
of the compiled scorer). Ours is timed twice: the first run includes torch.compile (cold cache),
the second reuses the compiled graphs, as a second task or a later run does.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lib.data.corpus import corpus_documents  # noqa: E402
from lib.tokenizer import train_sentencepiece  # noqa: E402
from models import hf, llama  # noqa: E402


def sentences(rng: random.Random, docs: list[str], words: tuple[int, int]) -> str:
    doc = rng.choice(docs).split()
    n = rng.randint(*words)
    start = rng.randint(0, max(0, len(doc) - n))
    return " ".join(doc[start:start + n]) or "text"


def write_tasks(root: Path, docs: list[str], n: int, seed: int = 0) -> dict:
    """MMLU (original csv layout, 4 subjects) and HellaSwag files for us; json for lm-eval."""
    rng = random.Random(seed)
    lm_eval_files = {}
    for s in range(4):
        subject = ("anatomy", "astronomy", "virology", "philosophy")[s]
        for split, count in (("dev", 5), ("test", n // 4)):
            rows = [(sentences(rng, docs, (30, 60)), *[sentences(rng, docs, (3, 12)) for _ in range(4)],
                     rng.choice("ABCD")) for _ in range(count)]
            folder = root / "mmlu" / split
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(rows)
            records = [{"question": r[0], "subject": subject, "choices": list(r[1:5]),
                        "answer": "ABCD".index(r[5])} for r in rows]
            (root / f"hf_{subject}_{split}.json").write_text(json.dumps(records))
        lm_eval_files[f"mmlu_{subject}"] = {sp: str(root / f"hf_{subject}_{sp}.json") for sp in ("dev", "test")}
    hellaswag = [{"activity_label": sentences(rng, docs, (1, 3)), "ctx_a": sentences(rng, docs, (20, 35)),
                  "ctx_b": sentences(rng, docs, (3, 8)), "endings": [sentences(rng, docs, (10, 20)) for _ in range(4)],
                  "label": str(rng.randint(0, 3))} for _ in range(n)]
    (root / "hellaswag.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hellaswag))
    lm_eval_files["hellaswag"] = {"train": str(root / "hellaswag.jsonl"), "validation": str(root / "hellaswag.jsonl")}
    return lm_eval_files


def run_ours(model_dir: Path, tasks: Path, task: str, out: Path, compile: bool) -> tuple[float, dict]:
    from runners import evaluate
    path = tasks / "mmlu" if task == "mmlu" else tasks / "hellaswag.jsonl"
    start = time.perf_counter()
    evaluate.main([f"checkpoint.load={model_dir}", f"out_dir={out}", f"eval.tasks=[{task}]",
                   f"eval.{task}={path}", f"eval.compile={str(compile).lower()}"])
    seconds = time.perf_counter() - start
    samples = {}
    for line in (out / "samples.jsonl").read_text().splitlines():
        s = json.loads(line)
        samples[(s["subject"], s["doc_index"])] = s["loglikelihoods"]
    return seconds, samples


def run_lm_eval(model_dir: Path, files: dict, task: str, batch_size: int) -> tuple[float, dict]:
    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    manager = TaskManager()
    names = [n for n in files if n.startswith(task)]
    objs = [manager._factory.build(manager._entry(n), registry=manager._index, overrides={
        "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files[n]}}) for n in names]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=objs, num_fewshot=5 if task == "mmlu" else 0,
                                  log_samples=True, verbosity="ERROR")
    seconds = time.perf_counter() - start
    samples = {}
    for n in names:
        subject = n[5:] if task == "mmlu" else None
        for s in out["samples"][n]:
            samples[(subject, s["doc_id"])] = [r[0] for r in s["filtered_resps"]]
    return seconds, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--docs", type=int, default=200, help="documents per task")
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--tasks", default="mmlu,hellaswag")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-evaluate-"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    config = llama.PRESETS[args.preset]
    docs = corpus_documents()
    model_dir = work / "model"
    hf.save(model_dir, config, llama.init(config, seed=0))
    train_sentencepiece(docs, min(config.vocab_size, 8000), model_dir / "tokenizer.model")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    files = write_tasks(work / "tasks", docs, args.docs)
    print(f"model {args.preset} ({llama.num_params(config) / 1e6:.0f}M params), {args.docs} documents "
          f"per task, torch threads {torch.get_num_threads()}, {work}")
    for task in args.tasks.split(","):
        cold, ours = run_ours(model_dir, work / "tasks", task, work / f"ours-{task}-cold", compile=True)
        warm, _ = run_ours(model_dir, work / "tasks", task, work / f"ours-{task}-warm", compile=True)
        eager, _ = run_ours(model_dir, work / "tasks", task, work / f"ours-{task}-eager", compile=False)
        rows = {"ours compiled (cold: compiles)": cold, "ours compiled (warm)": warm, "ours eager": eager}
        worst = 0.0
        for batch in sorted({1, args.hf_batch}):
            seconds, theirs = run_lm_eval(model_dir, files, task, batch)
            rows[f"lm-eval HFLM batch {batch}"] = seconds
            worst = max(worst, max(abs(a - b) for k in theirs for a, b in zip(ours[k], theirs[k])))
        best_hf = min(v for k, v in rows.items() if k.startswith("lm-eval"))
        print(f"\n{task}: {len(ours)} documents; max |loglikelihood ours - lm-eval| = {worst:.2e}")
        for name, seconds in rows.items():
            print(f"  {name:<34} {seconds:8.1f} s  {len(ours) / seconds:8.2f} docs/s  "
                  f"{best_hf / seconds:5.2f}x lm-eval's best")


if __name__ == "__main__":
    main()
