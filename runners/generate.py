"""Text generation: `python -m runners.generate [config.yaml] [key=value ...]`.

    python -m runners.generate checkpoint.load=runs/pretrain/checkpoints prompt="The function"
    python -m runners.generate checkpoint.load=path/to/Llama-2-7b-hf prompts=prompts.jsonl \\
        out=outputs.jsonl generate.do_sample=true generate.top_p=0.9 generate.batch_size=16
    torchrun --nproc_per_node 2 -m runners.generate checkpoint.load=... mesh.tensor=2 prompt=...

Prompts: `prompt="..."` (or a list, `prompt=[a,b]`), or `prompts=` a .txt file (one prompt per
line; blank lines are skipped) or a .jsonl file of `{"prompt": "..."}` or `{"input_ids": [...]}`
lines (token ids need no tokenizer). Settings: the `generate.` section (Hugging Face names).

With `out=`, a jsonl line per input in input order: `index`, `input_ids` and `sequences`
(num_return_sequences of `output_ids`, `text`, `finish_reason`, `score`, `logprobs` when
asked). Without it, the texts are printed (a single prompt streams as it is generated). At the
end: prompt tokens/s, new tokens/s and time to first token (on stderr).
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch.distributed as dist
from tqdm import tqdm

from lib import cli
from lib import config as config_lib
from lib.decoding import GenerateConfig
from lib.errors import UserError
from parallel import sharding
from parallel.mesh import MeshConfig
from runners import inference


@dataclass(frozen=True)
class GenerateRunConfig:
    checkpoint: inference.ModelSource = inference.ModelSource()
    lora: inference.AdapterSource = inference.AdapterSource()
    data: inference.TokenizerSource = inference.TokenizerSource()
    generate: GenerateConfig = GenerateConfig()
    prompt: str | tuple[str, ...] | None = None   # one prompt, or a list
    prompts: str | None = None                     # a .txt (one per line) or .jsonl file
    out: str | None = None                         # write results as jsonl here
    device: Literal["auto", "npu", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    attention: Literal["auto", "reference", "sdpa", "npu_fusion"] = "auto"
    mesh: MeshConfig = field(default_factory=MeshConfig)
    logical_axis_rules: tuple[tuple[str, Any], ...] = field(default_factory=sharding.rule_spec)


@dataclass(frozen=True)
class Input:
    where: str                  # for messages: "prompt", "prompts.jsonl:3"
    prompt: str | list[int]     # text, or token ids


def read_inputs(cfg: GenerateRunConfig) -> list[Input]:
    if cfg.prompt is not None and cfg.prompts is not None:
        raise UserError("give prompt=... or prompts=<file>, not both")
    if cfg.prompt is not None:
        if isinstance(cfg.prompt, str):
            return [Input("prompt", cfg.prompt)]
        if not cfg.prompt:
            raise UserError("prompt=[] holds no prompt")
        return [Input(f"prompt[{i}]", p) for i, p in enumerate(cfg.prompt)]
    if cfg.prompts is None:
        raise UserError('nothing to generate from: give prompt="..." or prompts=<.txt or .jsonl file>')
    return read_prompt_file(Path(cfg.prompts))


def read_prompt_file(path: Path) -> list[Input]:
    """Prompts of a .txt file (one per non-blank line) or a .jsonl file ({"prompt"} or
    {"input_ids"} per line); errors name file:line."""
    if not path.is_file():
        raise UserError(f"prompts={path}: no such file")
    jsonl = path.suffix == ".jsonl"
    inputs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"prompts={path}: not UTF-8 text ({e})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        inputs.append(Input(where, _jsonl_prompt(line, where) if jsonl else line))
    if not inputs:
        raise UserError(f"prompts={path}: the file holds no prompt")
    return inputs


def _jsonl_prompt(line: str, where: str) -> str | list[int]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or ("prompt" in record) == ("input_ids" in record):
        raise UserError(f'{where}: expected an object with "prompt" (text) or "input_ids" '
                        f"(token ids), got {line.strip()[:80]}")
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise UserError(f'{where}: "prompt" must be a string')
        return record["prompt"]
    ids = record["input_ids"]
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError(f'{where}: "input_ids" must be a list of integers')
    return ids


def result_line(index: int, input_ids: list[int], sequences, logprobs: bool) -> dict:
    out = []
    for s in sequences:
        item = {"output_ids": s.output_ids, "text": s.text, "finish_reason": s.finish_reason,
                "score": s.score}
        if logprobs:
            item["logprobs"] = s.logprobs
        out.append(item)
    return {"index": index, "input_ids": input_ids, "sequences": out}


def write_jsonl(path: Path, lines: list[dict]) -> None:
    """All lines, or nothing: written beside `path` and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"out={path}: cannot write ({e.strerror or e})") from None


def main(argv: Sequence[str]) -> int:
    cfg = config_lib.parse_argv(GenerateRunConfig, argv)
    if not cfg.checkpoint.load:
        raise UserError("set checkpoint.load=<HF model directory or native checkpoint>")
    inputs = read_inputs(cfg)
    runtime = inference.RuntimeConfig(cfg.device, cfg.dtype, cfg.attention, cfg.mesh,
                                      cfg.logical_axis_rules)
    model = inference.load(cfg.checkpoint.load, adapter=cfg.lora.adapter, tokenizer=cfg.data.tokenizer,
                           runtime=runtime, defaults=cfg.generate)
    main_rank = not dist.is_initialized() or dist.get_rank() == 0
    where = [i.where for i in inputs]
    ids = [model.encode(i.prompt, i.where) for i in inputs]
    gen = cfg.generate
    stats = inference.GenerationStats()
    stream_one = (cfg.out is None and len(ids) == 1 and gen.num_return_sequences == 1
                  and gen.num_beams == 1 and model.tokenizer is not None)
    if stream_one:
        results = [_stream(model, ids[0], where, stats, main_rank)]
    else:
        bar = tqdm(total=len(ids), desc="generate", unit="prompt", dynamic_ncols=True,
                   disable=not main_rank or cfg.out is None and len(ids) == 1)
        results = model.generate(ids, where=where, stats=stats, progress=bar.update)
        bar.close()
    if main_rank:
        if cfg.out is not None:
            write_jsonl(Path(cfg.out), [result_line(i, ids[i], results[i], gen.return_logprobs)
                                        for i in range(len(ids))])
            print(f"wrote {len(ids)} result(s) to {cfg.out}", file=sys.stderr)
        elif not stream_one:
            _print_results(model, inputs, ids, results)
        print(stats.summary(), file=sys.stderr)
    return 0


def _stream(model: inference.Generator, ids: list[int], where, stats, main_rank: bool):
    text = inference.TextStream(model.tokenizer.decode, skip=model.eos_ids)
    if main_rank:
        print(model.tokenizer.decode(ids), end="", flush=True)

    def on_token(prompt: int, seq: int, token: int) -> None:
        piece = text.push(token)
        if main_rank and piece:
            print(piece, end="", flush=True)

    (result,) = model.generate([ids], where=where, stats=stats, on_token=on_token)
    if main_rank:
        print(flush=True)
    return result


def _print_results(model: inference.Generator, inputs: list[Input], ids, results) -> None:
    for i, (inp, seqs) in enumerate(zip(inputs, results)):
        if len(inputs) > 1 or len(seqs) > 1:
            print(f"=== {inp.where}")
        prompt = model.tokenizer.decode(ids[i]) if model.tokenizer is not None else None
        for j, s in enumerate(seqs):
            if len(seqs) > 1:
                print(f"--- sequence {j} (score {s.score:.3f}, {s.finish_reason})")
            if s.text is not None:
                print(prompt + s.text)
            else:
                print(" ".join(map(str, s.output_ids)))


if __name__ == "__main__":
    cli.run(main)
