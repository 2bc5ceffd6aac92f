"""Load a model once, then generate from strings or token ids: the Python API for research code.

    from runners.inference import load
    m = load("path/to/Llama-2-7b-hf")                # or a native checkpoint; adapter=, dtype=, ...
    m.generate("Hello", max_new_tokens=20, do_sample=True)[0].text
    m.generate(["Hello", [1, 15043, 29892]], num_beams=4, num_return_sequences=2)  # several prompts

Settings are `lib.decoding.GenerateConfig`'s (Hugging Face `generate` names). A single prompt
(a string or a list of ids) gives its list of `Sequence`s (num_return_sequences long: output_ids,
text, finish_reason, score, logprobs); a list of prompts gives one such list per prompt, in
order. Prompts are decoded `batch_size` at a time, longest first, with the compiled decoder of
`parallel.decode` (`compile=False`: the same functions, eagerly). `draft=` a smaller model
decodes speculatively.

`runners.generate` and `runners.chat` are built on this module: it also holds the config
sections they share (which model, which device, which dtype) and streaming text output.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lib import device as device_lib
from lib.decoding import GenerateConfig, Sequence, generate as decode_prompts, speculative
from lib.decoding.model import Cache, DecodeModel
from lib.errors import UserError
from lib.tokenizer import Tokenizer, load_tokenizer
from models import checkpoints, llama
from parallel import kernels as kernels_lib
from parallel import sharding
from parallel.decode import Decoder
from parallel.mesh import Mesh, MeshConfig, build_mesh, require_no_stages

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Prompt = str | Seq[int]
# on_token(prompt index, sequence index, token id), in each sequence's order
OnToken = Callable[[int, int, int], None]


# ---------------------------------------------------------------------------------------------
# Config sections shared by runners.generate and runners.chat


@dataclass(frozen=True)
class ModelSource:
    load: str | None = None       # an HF directory or a native checkpoint (root or step dir)


@dataclass(frozen=True)
class AdapterSource:
    adapter: str | None = None    # a PEFT LoRA adapter directory applied on top


@dataclass(frozen=True)
class TokenizerSource:
    tokenizer: str | None = None  # default: the model directory's, or the one the checkpoint records


@dataclass(frozen=True)
class RuntimeConfig:
    device: Literal["auto", "npu", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"   # auto: bf16 on accelerators, fp32 on CPU
    attention: Literal["auto", "reference", "sdpa", "npu_fusion"] = "auto"
    mesh: MeshConfig = field(default_factory=MeshConfig)
    logical_axis_rules: tuple[tuple[str, Any], ...] = field(default_factory=sharding.rule_spec)


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class GenerationStats:
    """Throughput of the generate calls it was passed to (summed over batches)."""
    prompts: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0       # after the prefill
    first_token_seconds: list[float] = field(default_factory=list)  # per batch
    compiled_graphs: int = 0          # graphs compiled meanwhile (their time is in the figures)
    speculative: speculative.SpeculativeStats | None = None

    def summary(self) -> str:
        ttft = sum(self.first_token_seconds) / max(len(self.first_token_seconds), 1)
        line = (f"{self.prompts} prompt(s): {self.prompt_tokens} prompt tokens at "
                f"{self.prompt_tokens / max(self.prefill_seconds, 1e-9):.1f} tokens/s, "
                f"{self.new_tokens} new tokens at {self.new_tokens / max(self.decode_seconds, 1e-9):.1f} "
                f"tokens/s, time to first token {ttft * 1000:.0f} ms")
        if self.compiled_graphs:
            line += f" (including compiling {self.compiled_graphs} graph(s) on first use)"
        if self.speculative is not None:
            s = self.speculative
            line += (f"; speculative: {s.tokens_per_step:.2f} tokens per target step, "
                     f"{100 * s.acceptance_rate:.0f}% of draft tokens accepted")
        return line


class TimedModel:
    """A DecodeModel that clocks its first forward (the prefill) and the moment the first token
    is known (the next forward starts, or generation ends)."""

    def __init__(self, model: DecodeModel, sync: Callable[[], None]):
        self.model, self.sync = model, sync
        self.vocab_size, self.max_len = model.vocab_size, model.max_len
        self.calls = 0
        self.prefilled = self.first_token = None

    def init_cache(self, batch: int, max_len: int, start: torch.Tensor) -> Cache:
        return self.model.init_cache(batch, max_len, start)

    def forward(self, tokens: torch.Tensor, cache: Cache, *, last_only: bool):
        if self.calls == 1:
            self.first_token = time.perf_counter()
        self.calls += 1
        out = self.model.forward(tokens, cache, last_only=last_only)
        if self.calls == 1:
            self.sync()
            self.prefilled = time.perf_counter()
        return out

    def reorder(self, cache: Cache, rows: torch.Tensor) -> Cache:
        return self.model.reorder(cache, rows)

    def rewind(self, cache: Cache, n: int) -> Cache:
        return self.model.rewind(cache, n)


# ---------------------------------------------------------------------------------------------
# The model


class Generator:
    """A loaded model with its tokenizer: `generate` on strings or token ids (see the module doc).

    Attributes: `config` (llama.Config), `params` (on one CPU process the projections are
    oneDNN-prepacked `parallel.kernels.PackedWeight`s, which `llama.forward` applies as they
    are), `tokenizer` (None when the checkpoint has none: prompts are then token ids), `eos_ids`,
    `defaults` (the GenerateConfig settings start from).
    """

    def __init__(self, config: llama.Config, params: llama.Params, tokenizer: Tokenizer | None, *,
                 dev: device_lib.Device, dtype: torch.dtype, mesh: Mesh, rules: sharding.Rules,
                 kernels: llama.Kernels, eos_ids: Seq[int] = (), defaults: GenerateConfig | None = None,
                 cache_dir: str | Path | None = None):
        if mesh.device_mesh is None and kernels_lib.can_prepack(params):
            # once, for every decoder built here (the plain copy is not kept)
            params = kernels_lib.prepack_projections(params)
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.eos_ids = list(eos_ids)
        self.defaults = defaults or GenerateConfig()
        self.dev, self.dtype, self.mesh, self.rules, self.kernels = dev, dtype, mesh, rules, kernels
        self.cache_dir = str(cache_dir or device_lib.cache_dir() / "inductor")
        self._decoders: dict[tuple, Decoder] = {}

    # -- models ---------------------------------------------------------------------------------

    def decoder(self, compile: bool = True) -> Decoder:
        """This model as a compiled (or eager) `DecodeModel`; built once per mode."""
        return self._decoder_for("target", self.params, self.config, compile)

    def _decoder_for(self, key: str, params, config: llama.Config, compile: bool) -> Decoder:
        if (key, compile) not in self._decoders:
            backend = kernels_lib.compile_backend(self.dev) if compile else None
            self._decoders[key, compile] = Decoder(
                params, config, kernels=self.kernels, backend=backend, cache_dir=self.cache_dir,
                mesh=self.mesh, rules=self.rules)
        return self._decoders[key, compile]

    def _draft(self, path: str, compile: bool) -> Decoder:
        if ("draft:" + path, compile) not in self._decoders:
            config, params, _ = checkpoints.load_pretrained(path, dtype=self.dtype,
                                                            device=self.dev.torch_device,
                                                            merge_adapter=True)
            if config.vocab_size != self.config.vocab_size:
                raise UserError(f"generate.draft={path}: its vocabulary ({config.vocab_size} tokens) "
                                f"differs from the model's ({self.config.vocab_size}); the draft must "
                                "share the model's tokenizer")
            return self._decoder_for("draft:" + path, params, config, compile)
        return self._decoders["draft:" + path, compile]

    # -- prompts --------------------------------------------------------------------------------

    def encode(self, prompt: Prompt, where: str = "prompt") -> list[int]:
        """Token ids of a text prompt (with bos, as LLaMA was trained), or the ids themselves."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError(f"{where} is text, but the model has no tokenizer: give data.tokenizer="
                                "<tokenizer.model or tokenizer.json>, or prompts as token ids")
            ids = self.tokenizer.encode(prompt, bos=True)
        else:
            ids = [int(t) for t in prompt]
        self.check_prompt(ids, where)
        return ids

    def check_prompt(self, ids: Seq[int], where: str, max_new_tokens: int | None = None) -> None:
        """UserError naming `where` for an empty prompt, ids outside the vocabulary, or a prompt
        that does not fit the context (alone, or with max_new_tokens)."""
        vocab, context = self.config.vocab_size, self.config.max_seq_len
        if not ids:
            raise UserError(f"{where} is empty")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise UserError(f"{where}: token id {bad} is outside the vocabulary [0, {vocab})")
        if len(ids) > context:
            raise UserError(f"{where} has {len(ids)} tokens, {len(ids) - context} more than the "
                            f"model's context (max_seq_len={context})")
        if max_new_tokens is not None and len(ids) + max_new_tokens > context:
            over = len(ids) + max_new_tokens - context
            raise UserError(f"{where} has {len(ids)} tokens: with generate.max_new_tokens="
                            f"{max_new_tokens} it needs {len(ids) + max_new_tokens} positions, {over} "
                            f"more than the model's context (max_seq_len={context}); shorten it or "
                            f"lower max_new_tokens to {max(context - len(ids), 0)}")

    def settings(self, cfg: GenerateConfig | None = None, **overrides) -> GenerateConfig:
        return dataclasses.replace(cfg or self.defaults, **overrides)

    # -- generating -----------------------------------------------------------------------------

    def generate(self, prompts: Prompt | Seq[Prompt], cfg: GenerateConfig | None = None, *,
                 on_token: OnToken | None = None, stats: GenerationStats | None = None,
                 progress: Callable[[int], None] | None = None, where: Seq[str] | None = None,
                 **settings) -> list[Sequence] | list[list[Sequence]]:
        """Sequences for one prompt, or a list of them per prompt (see the module docstring).

        cfg/settings: GenerateConfig, or its fields as keywords (over `defaults`).
        on_token: streaming, `on_token(prompt index, sequence index, token id)`.
        stats: accumulates prompt/new tokens and timings. progress(n): n more prompts done.
        where: a name per prompt for error messages (e.g. "prompts.jsonl:3").
        """
        cfg = self.settings(cfg, **settings)
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        items = [prompts] if single else list(prompts)
        if not items:
            raise UserError("no prompts")
        names = list(where) if where is not None else [f"prompt {i}" for i in range(len(items))]
        ids = [self.encode(p, name) for p, name in zip(items, names)]
        for i, name in zip(ids, names):
            self.check_prompt(i, name, cfg.max_new_tokens)
        results: list[list[Sequence] | None] = [None] * len(ids)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # less padding per batch
        for at in range(0, len(order), cfg.batch_size):
            batch = order[at:at + cfg.batch_size]
            for i, seqs in zip(batch, self._batch([ids[i] for i in batch], batch, cfg, on_token, stats)):
                results[i] = seqs
            if progress is not None:
                progress(len(batch))
        return results[0] if single else results

    def _batch(self, prompts: list[list[int]], indices: list[int], cfg: GenerateConfig,
               on_token: OnToken | None, stats: GenerationStats | None) -> list[list[Sequence]]:
        n = cfg.num_return_sequences
        stream = None if on_token is None else \
            (lambda row, token: on_token(indices[row // n], row % n, token))
        decode_text = self.tokenizer.decode if self.tokenizer is not None else None
        sync = lambda: device_lib.synchronize(self.dev)
        model = TimedModel(self.decoder(cfg.compile), sync)
        graphs = _compiled_graphs()
        sync()
        began = time.perf_counter()
        kw = dict(eos_ids=self.eos_ids, pad_id=0, decode_text=decode_text, on_token=stream)
        spec = None
        if cfg.draft is not None:
            draft = self._draft(cfg.draft, cfg.compile)
            results, spec = speculative.generate(model, draft, prompts, cfg,
                                                 draft_tokens=cfg.draft_tokens, **kw)
        else:
            results = decode_prompts(model, prompts, cfg, **kw)
        sync()
        ended = time.perf_counter()
        if stats is not None:
            prefilled = model.prefilled or ended
            stats.prompts += len(prompts)
            stats.prompt_tokens += sum(len(p) for p in prompts)
            stats.new_tokens += sum(len(s.output_ids) for seqs in results for s in seqs)
            stats.prefill_seconds += prefilled - began
            stats.decode_seconds += ended - prefilled
            stats.first_token_seconds.append((model.first_token or ended) - began)
            stats.compiled_graphs += _compiled_graphs() - graphs
            if spec is not None:
                total = stats.speculative or speculative.SpeculativeStats()
                stats.speculative = speculative.SpeculativeStats(
                    total.target_steps + spec.target_steps, total.proposed + spec.proposed,
                    total.accepted + spec.accepted)
        return results


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


# ---------------------------------------------------------------------------------------------
# Loading


def resolve_dtype(name: str, dev: device_lib.Device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if dev.kind == "cpu" else torch.bfloat16
    return DTYPES[name]


def load(path: str | Path, *, adapter: str | Path | None = None, tokenizer: str | Path | None = None,
         runtime: RuntimeConfig = RuntimeConfig(), defaults: GenerateConfig | None = None,
         **settings) -> Generator:
    """A `Generator` for the model at `path` (an HF directory or a native checkpoint), with a
    PEFT `adapter` merged in, on the device `runtime` picks (under torchrun: sharded by its mesh
    and rules). `settings`: GenerateConfig fields every `generate` call starts from."""
    dev = device_lib.detect(runtime.device)
    device_lib.init_distributed(dev)
    require_no_stages(runtime.mesh, "generation")
    mesh = build_mesh(runtime.mesh, dev.kind)
    rules = sharding.logical_axis_rules(runtime.logical_axis_rules, mesh)
    dtype = resolve_dtype(runtime.dtype, dev)
    config, params, _ = checkpoints.load_pretrained(path, dtype=dtype, device=dev.torch_device,
                                                    adapter=adapter, merge_adapter=True)
    tokenizer_file = tokenizer or checkpoints.find_tokenizer(path, adapter)
    tok = load_tokenizer(tokenizer_file) if tokenizer_file is not None else None
    if tok is not None and tok.vocab_size > config.vocab_size:
        raise UserError(f"tokenizer {tokenizer_file} has {tok.vocab_size} tokens, more than the "
                        f"model's vocabulary of {config.vocab_size}: they do not belong together")
    defaults = dataclasses.replace(defaults or GenerateConfig(), **settings)
    return Generator(config, params, tok, dev=dev, dtype=dtype, mesh=mesh, rules=rules,
                     kernels=kernels_lib.kernels_for(dev, runtime.attention),
                     eos_ids=model_eos_ids(path, tok), defaults=defaults)


def model_eos_ids(path: str | Path, tok: Tokenizer | None) -> list[int]:
    """The ids generation stops on: an HF directory's generation_config.json `eos_token_id`
    (LLaMA-3-Instruct lists end-of-turn there too), else the tokenizer's eos, else none."""
    gen_file = Path(path) / "generation_config.json"
    if gen_file.is_file():
        from lib import config as config_lib
        eos = config_lib.read_json(gen_file).get("eos_token_id")
        if eos is not None:
            return [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]
    return [tok.eos_id] if tok is not None else []


# ---------------------------------------------------------------------------------------------
# Streaming text


class TextStream:
    """Token ids in, new text out: decodes the ids so far and returns what was not shown yet,
    holding back an unfinished multi-byte character (decoded as U+FFFD) until it completes."""

    def __init__(self, decode: Callable[[Seq[int]], str], skip: Seq[int] = ()):
        self.decode, self.skip = decode, set(skip)
        self.ids: list[int] = []
        self.shown = 0

    def push(self, token: int) -> str:
        if token in self.skip:
            return ""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new
