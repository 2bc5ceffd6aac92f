"""Evaluation: `python -m runners.evaluate [config.yaml] [key=value ...]`.

Scores a model on MMLU, C-Eval, BoolQ, PIQA, HellaSwag or your own multiple-choice file, read
from the files users download, exactly as lm-evaluation-harness 0.4 defines and scores them
(lib/evals/), with the batched, compiled scorer of parallel/score.py.

    python -m runners.evaluate checkpoint.load=path/to/Llama-2-7b-hf \\
        eval.tasks=[mmlu,boolq,piqa,hellaswag] eval.mmlu=mmlu/data eval.boolq=boolq/dev.jsonl \\
        eval.piqa=piqa eval.hellaswag=hellaswag/hellaswag_val.jsonl out_dir=runs/eval

Writes `<out_dir>/results.json` (figures, settings, model, time), `<out_dir>/samples.jsonl` (one
line per document, written as documents are done, so an interrupted run leaves valid lines)
and prints the accuracy table. Under torchrun the documents are split over the data-parallel
ranks (and the model over `mesh.tensor`).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from lib import cli, device, evals
from lib import config as config_lib
from lib.errors import UserError
from lib.evals import report
from lib.evals.doc import Doc, Scored
from lib.evals.tokens import encode_pair
from lib.tokenizer import Tokenizer, load_tokenizer
from models import checkpoints, llama
from parallel import kernels, score, sharding, train_step
from parallel.mesh import MeshConfig, build_mesh

# Documents scored per round: results reach samples.jsonl this often.
CHUNK_DOCS = 512


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...] = ("mmlu",)
    # Where each task's files are (see README "Evaluation" for the layouts read).
    mmlu: str | None = None
    ceval: str | None = None
    boolq: str | None = None
    piqa: str | None = None
    hellaswag: str | None = None
    choice: str | None = None           # your own {"context", "choices", "answer"} jsonl
    choice_fewshot: str | None = None   # solved examples for `choice` (first num_fewshot used)
    num_fewshot: int | None = None      # None: MMLU and C-Eval 5, others 0
    limit: int | None = None            # first N documents of each task (of each exam subject)
    batch_size: int | None = None       # rows per forward; None: as many as fit tokens_per_batch
    tokens_per_batch: int = 4096        # padded tokens per forward when batch_size is None
    method: Literal["loglikelihood"] = "loglikelihood"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = True

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("tasks is empty; known tasks: " + ", ".join(evals.TASKS))
        for task in self.tasks:
            if task not in evals.TASKS:
                raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(evals.TASKS)}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"num_fewshot={self.num_fewshot} must be >= 0")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.tokens_per_batch < 1:
            raise ValueError(f"tokens_per_batch={self.tokens_per_batch} must be >= 1")


@dataclass(frozen=True)
class ModelSource:
    load: str | None = None   # an HF directory or a native checkpoint (root or step dir)


@dataclass(frozen=True)
class AdapterSource:
    adapter: str | None = None  # a PEFT LoRA adapter directory applied on top


@dataclass(frozen=True)
class TokenizerSource:
    tokenizer: str | None = None  # default: the model directory's, or the checkpoint's recorded one


@dataclass(frozen=True)
class EvaluateConfig:
    checkpoint: ModelSource = ModelSource()
    lora: AdapterSource = AdapterSource()
    data: TokenizerSource = TokenizerSource()
    eval: EvalConfig = EvalConfig()
    device: Literal["auto", "npu", "cuda", "cpu"] = "auto"
    mesh: MeshConfig = field(default_factory=MeshConfig)
    logical_axis_rules: tuple[tuple[str, Any], ...] = field(default_factory=sharding.rule_spec)
    out_dir: str = "runs/eval"


def load_tokenizer_for(cfg: EvaluateConfig) -> Tokenizer:
    """`data.tokenizer`, else the one that goes with the model (models.checkpoints.find_tokenizer)."""
    path = cfg.data.tokenizer or checkpoints.find_tokenizer(cfg.checkpoint.load, cfg.lora.adapter)
    if path is None:
        raise UserError(f"no tokenizer found with {cfg.checkpoint.load}: set data.tokenizer=<file>")
    return load_tokenizer(path)


# ---------------------------------------------------------------------------------------------


def task_docs(cfg: EvalConfig) -> list[Doc]:
    docs: list[Doc] = []
    for task in cfg.tasks:
        path = getattr(cfg, task)
        if path is None:
            raise UserError(f"eval.tasks includes {task}: set eval.{task}=<path to its files>")
        docs += evals.load_docs(task, path, cfg.num_fewshot, cfg.limit, cfg.choice_fewshot)
    return docs


def sample_line(s: Scored) -> dict:
    return {"task": s.doc.task, "subject": s.doc.subject, "doc_index": s.doc.index,
            "loglikelihoods": list(s.loglikelihoods), "prediction": s.prediction,
            "prediction_norm": s.prediction_norm, "target": s.doc.target, "correct": s.correct}


def evaluate(docs: Sequence[Doc], tok: Tokenizer, scorer: score.Scorer, samples_file=None,
             show_progress: bool = True) -> tuple[list[Scored], int]:
    """Every document scored, in order; writes one samples line per document as it is done.
    Returns the scored documents and how many had a context truncated to fit the model."""
    scored: list[Scored] = []
    truncated_docs = 0
    bar = tqdm(total=len(docs), desc="evaluate", unit="doc", disable=not show_progress,
               dynamic_ncols=True)
    try:
        for start in range(0, len(docs), CHUNK_DOCS):
            chunk = docs[start:start + CHUNK_DOCS]
            requests, owner = [], []
            for d, doc in enumerate(chunk):
                for cont in doc.continuations:
                    requests.append(encode_pair(tok, doc.context, cont))
                    owner.append(d)
            results, truncated = scorer(requests)
            lls: list[list[float]] = [[] for _ in chunk]
            for d, (ll, _) in zip(owner, results):
                lls[d].append(ll)
            truncated_docs += len({owner[i] for i in truncated})
            for doc, doc_lls in zip(chunk, lls):
                s = Scored(doc, tuple(doc_lls))
                scored.append(s)
                if samples_file is not None:
                    samples_file.write(json.dumps(sample_line(s), ensure_ascii=False) + "\n")
            if samples_file is not None:
                samples_file.flush()
            bar.update(len(chunk))
    finally:
        bar.close()
    return scored, truncated_docs


def main(argv: Sequence[str]) -> int:
    cfg = config_lib.parse_argv(EvaluateConfig, argv)
    if not cfg.checkpoint.load:
        raise UserError("set checkpoint.load=<HF model directory or native checkpoint>")
    if not cfg.out_dir:
        raise UserError("out_dir is empty: give a directory for results.json and samples.jsonl")
    started = time.time()
    dev = device.detect(cfg.device)
    dist_info = device.init_distributed(dev)
    mesh = build_mesh(cfg.mesh, dev.kind)
    rules = sharding.logical_axis_rules(cfg.logical_axis_rules, mesh)
    docs = task_docs(cfg.eval)  # read (and checked) before the model is loaded

    # Adapters merged: scoring never trains them, and the merged weights cost nothing extra.
    model, params, _ = checkpoints.load_pretrained(
        cfg.checkpoint.load, dtype=train_step.DTYPES[cfg.eval.dtype], device=dev.torch_device,
        adapter=cfg.lora.adapter, merge_adapter=True)
    tok = load_tokenizer_for(cfg)
    if tok.vocab_size > model.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary "
                        f"is {model.vocab_size}: they do not belong together")
    params = sharding.shard_params(params, llama.param_axes(model), rules, mesh)
    attention = "reference" if mesh.device_mesh is not None else "auto"
    scorer = score.Scorer(
        params, model, mesh, rules, kernels=kernels.kernels_for(dev, attention),
        backend=kernels.compile_backend(dev) if cfg.eval.compile else None,
        cache_dir=str(Path(cfg.out_dir) / "inductor-cache"),
        tokens_per_batch=cfg.eval.tokens_per_batch, rows_per_batch=cfg.eval.batch_size,
        pad_id=tok.pad_id, device=dev.torch_device)

    out = Path(cfg.out_dir)
    main_rank = dist_info.rank == 0
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
    samples = open(out / "samples.jsonl", "w", encoding="utf-8") if main_rank else None
    try:
        scored, truncated = evaluate(docs, tok, scorer, samples, show_progress=main_rank)
    finally:
        if samples is not None:
            samples.close()
    summary = report.summarize(scored)
    if main_rank:
        results = {"results": summary, "truncated_contexts": truncated,
                   "model": {"load": cfg.checkpoint.load, "adapter": cfg.lora.adapter,
                             "config": config_lib.to_dict(model)},
                   "settings": config_lib.to_dict(cfg.eval), "world_size": dist_info.world_size,
                   "seconds": round(time.time() - started, 2)}
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False))
        os.replace(tmp, out / "results.json")
        print(report.format_table(summary))
        if truncated:
            print(f"{truncated} document(s) had their context truncated on the left to fit "
                  f"the model's {model.max_seq_len} tokens")
        print(f"results: {out}/results.json, samples: {out}/samples.jsonl")
    return 0


if __name__ == "__main__":
    cli.run(main)
