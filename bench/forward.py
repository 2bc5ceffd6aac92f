"""Forward-pass throughput on CPU: our pure-function LLaMA (eager and torch.compile) vs HF.

    .venv/bin/python bench/forward.py                      # preset "small", batch 4, seq 256
    .venv/bin/python bench/forward.py --preset tiny --reps 3

All variants run the same weights in one process, fp32, under no_grad. Timings are interleaved
(one call of each variant per round) so load from other jobs on the machine hits them alike;
the median per variant is reported.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-forward-inductor-"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402

from models import hf, llama  # noqa: E402


def hf_model(config: llama.Config, params: llama.Params) -> torch.nn.Module:
    """transformers' LlamaForCausalLM (its default attention, sdpa) holding the same weights."""
    hf_config = transformers.LlamaConfig.from_dict(hf.config_to_hf(config))
    model = transformers.LlamaForCausalLM(hf_config).float().eval()
    model.load_state_dict(hf.state_dict_from_params(config, params), strict=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = llama.PRESETS[args.preset]
    params = llama.init(config, seed=0)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    reference = hf_model(config, params)

    def ours_eager():
        return llama.forward(params, tokens, config)

    def theirs():
        return reference(input_ids=tokens).logits

    variants = {"ours eager": ours_eager, "HF eager": theirs}
    if not args.no_compile:
        compiled = torch.compile(llama.forward)

        def ours_compiled():
            return compiled(params, tokens, config)
        variants["ours compiled"] = ours_compiled

    with torch.no_grad():
        for name, fn in variants.items():  # warm up (and compile) before timing
            start = time.perf_counter()
            fn()
            print(f"warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
        expected = theirs()
        for name, fn in variants.items():
            if fn is theirs:
                continue
            diff = (fn() - expected).abs().max().item()
            print(f"max |{name} - HF| logits: {diff:.2e}")
        times = {name: [] for name in variants}
        for _ in range(args.reps):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    tokens_per_call = args.batch * args.seq
    hf_rate = tokens_per_call / statistics.median(times["HF eager"])
    print(f"\n{args.preset}: batch {args.batch} x seq {args.seq}, fp32, {torch.get_num_threads()} threads, "
          f"{args.reps} interleaved reps, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'variant':<15}{'median s':>10}{'tokens/s':>11}{'vs HF':>8}")
    for name, ts in times.items():
        rate = tokens_per_call / statistics.median(ts)
        print(f"{name:<15}{statistics.median(ts):>10.3f}{rate:>11.0f}{rate / hf_rate:>7.2f}x")


if __name__ == "__main__":
    main()
