"""The `generate.` config section: Hugging Face `generate` names, defaults and semantics.

Settings carry over from HF (`GenerationConfig`) unchanged, so a user's `top_p=0.9
temperature=0.7 do_sample=true` means here what it means there, including HF's defaults
(`top_k=50` when sampling). What HF's `GenerationConfig.validate` refuses is refused here too,
plus the out-of-range values its logits processors refuse at run time; settings that only one
strategy uses are reported (a warning, as HF does) when the strategy in force ignores them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

from lib import config as config_lib


@dataclass(frozen=True)
class GenerateConfig:
    max_new_tokens: int = 128        # most tokens generated per sequence (eos included)
    min_new_tokens: int = 0          # eos is suppressed until this many tokens exist
    do_sample: bool = False          # False: greedy (or beam search); True: sampling (or beam sampling)
    temperature: float = 1.0         # sampling: logits / temperature
    top_k: int = 50                  # sampling: keep the k most likely tokens (0 = off; HF's default 50)
    top_p: float = 1.0               # sampling: keep the smallest set with probability >= top_p (1 = off)
    min_p: float = 0.0               # sampling: drop tokens below min_p x the top probability (0 = off)
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (CTRL's rule)
    no_repeat_ngram_size: int = 0    # an n-gram may occur once in prompt + output (0 = off)
    num_beams: int = 1               # > 1: beam search (with do_sample: beam sampling)
    length_penalty: float = 1.0      # beam score = sum of log-probs / length ** length_penalty
    early_stopping: bool | Literal["never"] = False  # beam search stopping rule, as HF
    num_return_sequences: int = 1    # sequences returned per prompt (<= num_beams in beam search)
    eos_token_id: int | tuple[int, ...] | None = None  # None: the tokenizer's; [] : never stop on a token
    stop: str | tuple[str, ...] = ()  # stop strings (HF's stop_strings): the output ends before them
    seed: int = 0                    # sampling: the same seed, prompts and batch give the same tokens
    return_logprobs: bool = False    # per-token log-probabilities (ModelLink's return_output_log_probs)
    batch_size: int = 8              # prompts decoded together (runners.generate)
    compile: bool = True             # compile prefill and the decode step; false runs them eagerly
    draft: str | None = None         # speculative decoding: a smaller LLaMA (HF dir or checkpoint)
    draft_tokens: int = 4            # speculative decoding: tokens the draft proposes per target step

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        config_lib.check_finite(self)
        self._check_ranges()
        self._check_combinations()
        self._report_ignored()

    def _check_ranges(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens={self.min_new_tokens} must be >= 0")
        if self.temperature <= 0:
            hint = " (for greedy decoding set do_sample=false)" if self.temperature == 0 else ""
            raise ValueError(f"temperature={self.temperature} must be a positive number{hint}")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]; 1 turns it off "
                             f"(ModelLink's top_p=0 for 'off' is top_p=1 here)")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1] (0 turns it off)")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 turns it off)")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size={self.no_repeat_ngram_size} must be >= 0 (0 turns it off)")
        if self.num_beams < 1:
            raise ValueError(f"num_beams={self.num_beams} must be >= 1")
        if self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences={self.num_return_sequences} must be >= 1")
        ids = self.eos_ids or ()
        if any(i < 0 for i in ids):
            raise ValueError(f"eos_token_id={self.eos_token_id} must hold token ids >= 0")
        if any(not s for s in self.stop):
            raise ValueError(f"stop={list(self.stop)} holds an empty string")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.draft_tokens < 1:
            raise ValueError(f"draft_tokens={self.draft_tokens} must be >= 1")

    def _check_combinations(self) -> None:
        if self.num_return_sequences > 1:
            if self.num_beams == 1 and not self.do_sample:
                raise ValueError(
                    f"num_return_sequences={self.num_return_sequences} needs do_sample=true or "
                    f"num_beams > 1: greedy decoding returns one sequence per prompt")
            if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
                raise ValueError(f"num_return_sequences={self.num_return_sequences} must be <= "
                                 f"num_beams={self.num_beams} in beam search")
        if self.draft is not None and self.num_beams > 1:
            raise ValueError(f"draft={self.draft}: speculative decoding works with greedy decoding "
                             f"and sampling, not beam search (num_beams={self.num_beams})")

    def _report_ignored(self) -> None:
        sampling_only = beam_only = []
        if not self.do_sample:
            # top_k=50 is HF's default, so it is not reported (HF does the same)
            sampling_only = [f"{k}={v}" for k, v, off in (
                ("temperature", self.temperature, 1.0), ("top_k", self.top_k, 50),
                ("top_p", self.top_p, 1.0), ("min_p", self.min_p, 0.0)) if v != off]
        if self.num_beams == 1:
            beam_only = [f"{k}={v}" for k, v, off in (
                ("length_penalty", self.length_penalty, 1.0),
                ("early_stopping", self.early_stopping, False)) if v != off]
        for names, needs in ((sampling_only, "do_sample=true"), (beam_only, "num_beams > 1")):
            if names:
                warnings.warn(f"generate: {', '.join(names)} only apply with {needs}; "
                              f"{self.strategy} decoding ignores them", stacklevel=4)

    @property
    def eos_ids(self) -> tuple[int, ...] | None:
        """eos_token_id as a tuple (None: use the tokenizer's)."""
        if self.eos_token_id is None:
            return None
        return (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id)

    @property
    def strategy(self) -> str:
        """"greedy" | "sample" | "beam" | "beam-sample" (HF's generation modes)."""
        if self.num_beams > 1:
            return "beam-sample" if self.do_sample else "beam"
        return "sample" if self.do_sample else "greedy"
