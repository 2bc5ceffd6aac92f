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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from lib import cli, device, evals
from lib import config as config_lib
from lib.errors import UserError
from lib.evals import report
from lib.evals.doc import Answered, Doc, Outcome, Scored
from lib.evals.tokens import doc_requests, scored_docs
from lib.tokenizer import Tokenizer, load_tokenizer
from models import checkpoints, llama
from parallel import kernels, score, sharding
from parallel.mesh import MeshConfig, build_mesh, require_no_stages
from runners import inference

# Documents scored per round: results reach samples.jsonl this often.
CHUNK_DOCS = 512


@dataclass(frozen=True)
class EvalConfig(evals.TaskConfig):
    """The tasks (lib.evals.TaskConfig) and how they are scored."""
    tasks: tuple[str, ...] = ("mmlu",)
    batch_size: int | None = None       # rows per forward; None: as many as fit tokens_per_batch
    tokens_per_batch: int = 4096        # padded tokens per forward when batch_size is None
    # loglikelihood: lm-eval's scoring. generate: ModelLink's way for the lettered exams (MMLU,
    # C-Eval): greedy-generate max_new_tokens after the prompt, take the first choice letter.
    method: Literal["loglikelihood", "generate"] = "loglikelihood"
    max_new_tokens: int = 4
    compile: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not self.tasks:
            raise ValueError("tasks is empty; known tasks: " + ", ".join(evals.TASKS))
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.tokens_per_batch < 1:
            raise ValueError(f"tokens_per_batch={self.tokens_per_batch} must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        lettered = ("mmlu", "ceval")
        if self.method == "generate" and any(t not in lettered for t in self.tasks):
            raise ValueError(f"method=generate answers lettered exams ({', '.join(lettered)}); "
                             f"score {[t for t in self.tasks if t not in lettered]} with "
                             "method=loglikelihood")


@dataclass(frozen=True)
class EvaluateConfig:
    checkpoint: inference.ModelSource = inference.ModelSource()
    lora: inference.AdapterSource = inference.AdapterSource()
    data: inference.TokenizerSource = inference.TokenizerSource()
    eval: EvalConfig = EvalConfig()
    device: Literal["auto", "npu", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on accelerators, fp32 on CPU
    mesh: MeshConfig = field(default_factory=MeshConfig)
    logical_axis_rules: tuple[tuple[str, Any], ...] = field(default_factory=sharding.rule_spec)
    out_dir: str = "runs/eval"


def load_tokenizer_for(cfg: EvaluateConfig) -> Tokenizer:
    """`data.tokenizer`, else the one that goes with the model (models.checkpoints.find_tokenizer)."""
    path = cfg.data.tokenizer or checkpoints.find_tokenizer(cfg.checkpoint.load, cfg.lora.adapter)
    if path is None:
        raise UserError(f"no tokenizer found with {cfg.checkpoint.load}: set data.tokenizer=<file>")
    return load_tokenizer(path)


# A judge turns a chunk of documents into their outcomes and how many had to be truncated.
Judge = Callable[[Sequence[Doc]], tuple[list[Outcome], int]]


def sample_line(o: Outcome) -> dict:
    line = {"task": o.doc.task, "subject": o.doc.subject, "doc_index": o.doc.index}
    if isinstance(o, Scored):
        line["loglikelihoods"] = list(o.loglikelihoods)
    else:
        line["generated"] = o.text
    return {**line, "prediction": o.prediction, "prediction_norm": o.prediction_norm,
            "target": o.doc.target, "correct": o.correct}


def by_loglikelihood(tok: Tokenizer, params: llama.Params, scorer: score.Scorer) -> Judge:
    """lm-eval's multiple choice: every choice's continuation scored in one batched pass."""
    def judge(docs: Sequence[Doc]) -> tuple[list[Outcome], int]:
        requests, owner = doc_requests(tok, docs)
        results, truncated = scorer(params, requests)
        return scored_docs(docs, owner, [ll for ll, _ in results]), len({owner[i] for i in truncated})
    return judge


def by_generation(tok: Tokenizer, generator: inference.Generator, cfg: EvalConfig) -> Judge:
    """Greedy generation after the prompt; a prompt that leaves no room for max_new_tokens is
    truncated on the left, as lm-eval's generate_until does."""
    room = generator.config.max_seq_len - cfg.max_new_tokens
    settings = dict(max_new_tokens=cfg.max_new_tokens, do_sample=False, compile=cfg.compile,
                    batch_size=cfg.batch_size or 8)

    def judge(docs: Sequence[Doc]) -> tuple[list[Outcome], int]:
        prompts = [tok.encode(doc.context, bos=tok.adds_bos) for doc in docs]
        truncated = sum(len(p) > room for p in prompts)
        outputs = generator.generate([p[-room:] for p in prompts], **settings)
        return [Answered(doc, seqs[0].text or "") for doc, seqs in zip(docs, outputs)], truncated
    return judge


def evaluate(docs: Sequence[Doc], judge: Judge, samples_file=None,
             show_progress: bool = True) -> tuple[list[Outcome], int]:
    """Every document judged, in order, a chunk at a time; each chunk's samples lines are
    written when it is done. Returns the outcomes and how many contexts were truncated."""
    outcomes: list[Outcome] = []
    truncated = 0
    bar = tqdm(total=len(docs), desc="evaluate", unit="doc", disable=not show_progress,
               dynamic_ncols=True)
    try:
        for start in range(0, len(docs), CHUNK_DOCS):
            chunk, cut = judge(docs[start:start + CHUNK_DOCS])
            outcomes += chunk
            truncated += cut
            if samples_file is not None:
                samples_file.writelines(json.dumps(sample_line(o), ensure_ascii=False) + "\n" for o in chunk)
                samples_file.flush()
            bar.update(len(chunk))
    finally:
        bar.close()
    return outcomes, truncated


def main(argv: Sequence[str]) -> int:
    cfg = config_lib.parse_argv(EvaluateConfig, argv)
    if not cfg.checkpoint.load:
        raise UserError("set checkpoint.load=<HF model directory or native checkpoint>")
    if not cfg.out_dir:
        raise UserError("out_dir is empty: give a directory for results.json and samples.jsonl")
    started = time.time()
    dev = device.detect(cfg.device)
    dist_info = device.init_distributed(dev)
    require_no_stages(cfg.mesh, "runners.evaluate")
    mesh = build_mesh(cfg.mesh, dev.kind)
    rules = sharding.logical_axis_rules(cfg.logical_axis_rules, mesh)
    docs = evals.task_docs(cfg.eval)  # read (and checked) before the model is loaded

    # Adapters merged: scoring never trains them, and the merged weights cost nothing extra.
    dtype = inference.resolve_dtype(cfg.dtype, dev)
    model, params, _ = checkpoints.load_pretrained(
        cfg.checkpoint.load, dtype=dtype, device=dev.torch_device,
        adapter=cfg.lora.adapter, merge_adapter=True)
    tok = load_tokenizer_for(cfg)
    if tok.vocab_size > model.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary "
                        f"is {model.vocab_size}: they do not belong together")
    params = sharding.shard_params(params, llama.param_axes(model), rules, mesh)
    attention = "reference" if mesh.device_mesh is not None else "auto"
    model_kernels = kernels.kernels_for(dev, attention)
    cache_dir = str(Path(cfg.out_dir) / "inductor-cache")
    if cfg.eval.method == "generate":
        generator = inference.Generator(model, params, tok, dev=dev, dtype=dtype, mesh=mesh,
                                        rules=rules, kernels=model_kernels, eos_ids=[tok.eos_id],
                                        cache_dir=cache_dir)
        judge = by_generation(tok, generator, cfg.eval)
    else:
        judge = by_loglikelihood(tok, params, score.Scorer(
            model, mesh, rules, kernels=model_kernels, dtype=dtype,
            backend=kernels.compile_backend(dev) if cfg.eval.compile else None, cache_dir=cache_dir,
            tokens_per_batch=cfg.eval.tokens_per_batch, rows_per_batch=cfg.eval.batch_size,
            pad_id=tok.pad_id, device=dev.torch_device))

    out = Path(cfg.out_dir)
    main_rank = dist_info.rank == 0
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
    samples = open(out / "samples.jsonl", "w", encoding="utf-8") if main_rank else None
    try:
        outcomes, truncated = evaluate(docs, judge, samples, show_progress=main_rank)
    finally:
        if samples is not None:
            samples.close()
    summary = report.summarize(outcomes)
    if main_rank:
        results = {"results": summary, "truncated_contexts": truncated,
                   "model": {"load": cfg.checkpoint.load, "adapter": cfg.lora.adapter,
                             "config": config_lib.to_dict(model)},
                   "settings": config_lib.to_dict(cfg.eval), "dtype": str(dtype).removeprefix("torch."),
                   "world_size": dist_info.world_size,
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
