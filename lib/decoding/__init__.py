"""Decoding strategies over any `DecodeModel`: Hugging Face `generate` settings and semantics.

    from lib.decoding import GenerateConfig, generate
    results = generate(model, [[1, 15, 27]], GenerateConfig(do_sample=True, top_p=0.9),
                       eos_ids=[2], pad_id=0, decode_text=tokenizer.decode)

config.py      the `generate.` config section
processors.py  logits processing and token selection (pure functions, HF's order)
beam.py        beam search / beam sampling steps (HF's vectorised algorithm)
stopping.py    stop strings
generate.py    the loop: left padding, prefill, decode, eos, stop strings, streaming
model.py       the DecodeModel protocol the loop drives
"""
from lib.decoding.config import GenerateConfig
from lib.decoding.generate import Sequence, generate
from lib.decoding.model import Cache, DecodeModel

__all__ = ["Cache", "DecodeModel", "GenerateConfig", "Sequence", "generate"]
