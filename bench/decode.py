"""Decoding speed: our compiled decoder against Hugging Face `generate`, on the same weights.

    .venv/bin/python bench/decode.py                                   # small + 1b, 1 and 2 threads
    .venv/bin/python bench/decode.py --models tiny --threads 1 --prompt-len 16 --new-tokens 8  # smoke

For each model shape (random weights, fp32) and thread count, in a fresh process per thread
count (inductor bakes the thread count into its kernels), the same prompts are decoded by:

- ours:      `parallel.decode.Decoder` (inductor) driven by `lib.decoding.generate`;
- HF eager:  `LlamaForCausalLM.generate` with its default dynamic cache (sdpa attention);
- HF static: the same with `cache_implementation="static"` and its torch.compile of the decode
             forward (`CompileConfig`, forced on CPU), where that works (the error otherwise).

Cases: greedy batch 1 and batch 8, beam search with 4 beams (batch 1), sampling with top-p 0.9
(batch 1). eos is suppressed (min_new_tokens = max_new_tokens), so every system generates the
same number of tokens; greedy outputs are compared token for token. Each case runs once to
warm up (compiling) and then `--reps` times; the best run is reported:

- new tok/s:   generated tokens (all rows) per second after the first token;
- TTFT:        time to first token (ours: prefill + first choice, measured inside the loop; HF:
               a streamer's first call after the prompt; beam search: a max_new_tokens=1 run);
- prefill tok/s: prompt tokens (all rows) / TTFT;
- peak MB:     resident memory above the loaded model during the run (CUDA: max allocated);
- bound:       decode steps per second x weight bytes / measured memory bandwidth (a sum over a
               large tensor, this thread count): the fraction of the weight-streaming bound.

Speculative decoding (greedy, batch 1): the draft is the model's own first two layers with its
embeddings and head (a layer-skipping draft). Random weights give a model whose argmax every
layer reshuffles, so no cheap draft agrees with it: for this part the output projections of the
later layers are scaled by `--deep-layer-scale` (0.03: about 40% of proposals accepted), so the
first layers decide many tokens, as in a trained model whose early layers often agree with the
last (LayerSkip). Reported: tokens per target step, acceptance, and speed-up over plain decoding
with our decoder.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {
    # the 512-dim / 8-layer preset of BENCHMARKS.md, and TinyLlama-1.1B's shape
    "small": dict(preset="small"),
    "1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
               max_seq_len=2048),
    "tiny": dict(preset="tiny"),
}
CASES = {
    "greedy b1": dict(batch=1),
    "greedy b8": dict(batch=8),
    "beam 4": dict(batch=1, num_beams=4),
    "top-p b1": dict(batch=1, do_sample=True, top_p=0.9, top_k=0),
}
SYSTEMS = ("ours", "HF eager", "HF static+compile")


# ---------------------------------------------------------------------------------------------
# Measuring


def memory_bandwidth(torch, gib: float = 1.0, rounds: int = 5) -> dict[str, float]:
    """Bytes/s of reading (sum) and of copying a `gib` GiB fp32 tensor at the current threads."""
    n = int(gib * 2**30) // 4
    x = torch.ones(n)
    y = torch.empty_like(x)
    best_read = best_copy = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        x.sum()
        best_read = max(best_read, n * 4 / (time.perf_counter() - t))
        t = time.perf_counter()
        y.copy_(x)
        best_copy = max(best_copy, 2 * n * 4 / (time.perf_counter() - t))
    return {"read_GBps": best_read / 1e9, "copy_GBps": best_copy / 1e9}


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every millisecond (CUDA: max
    allocated bytes above the level at entry)."""

    def __init__(self, torch, cuda: bool):
        self.torch, self.cuda = torch, cuda

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
            return self
        self.base = self.peak = self._rss()
        self.running = True

        def sample():
            while self.running:
                self.peak = max(self.peak, self._rss())
                time.sleep(0.001)
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.peak = self.torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def megabytes(self) -> float:
        return (self.peak - self.base) / 2**20


# ---------------------------------------------------------------------------------------------
# One worker: one model shape at one thread count


def worker(args) -> dict:
    import torch
    import transformers

    from lib import pytree
    from lib.decoding import GenerateConfig, generate, speculative
    from models import hf, llama
    from parallel.decode import Decoder
    from runners import inference

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)
    spec = dict(MODELS[args.model])
    config = llama.PRESETS[spec.pop("preset")] if "preset" in spec else llama.Config(**spec)
    params = llama.init(config, seed=0, device=dev)
    weight_bytes = sum(t.numel() * t.element_size() for t in pytree.leaves(params)) \
        - params["embed"].numel() * params["embed"].element_size() * (0 if config.tie_embeddings else 1)
    bandwidth = memory_bandwidth(torch) if not cuda else {"read_GBps": float("nan"), "copy_GBps": float("nan")}

    hf_config = transformers.LlamaConfig.from_dict(hf.config_to_hf(config))
    hf_config.pad_token_id = 0
    reference = transformers.LlamaForCausalLM(hf_config).to(dev).float().eval()
    reference.load_state_dict(hf.state_dict_from_params(config, params), strict=True)

    g = torch.Generator().manual_seed(0)
    all_prompts = torch.randint(3, config.vocab_size, (8, args.prompt_len), generator=g)
    decoder = Decoder(params, config, backend="inductor" if not args.eager else None)
    new = args.new_tokens

    def settings(case: dict) -> dict:
        return {k: v for k, v in case.items() if k != "batch"}

    def run_ours(case: dict) -> dict:
        prompts = all_prompts[:case["batch"]].tolist()
        cfg = GenerateConfig(max_new_tokens=new, min_new_tokens=new, eos_token_id=2, seed=0,
                             num_return_sequences=1, **settings(case))
        model = inference.TimedModel(decoder, sync)
        sync()
        began = time.perf_counter()
        with torch.no_grad():
            out = generate(model, prompts, cfg)
        sync()
        ended = time.perf_counter()
        first = (model.first_token or ended) - began
        return {"seconds": ended - began, "ttft": first, "tokens": [s[0].output_ids for s in out]}

    class FirstToken(transformers.generation.streamers.BaseStreamer):
        def __init__(self):
            self.calls, self.at = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first call carries the prompt
                sync()
                self.at = time.perf_counter()

        def end(self):
            pass

    def run_hf(case: dict, static: bool) -> dict:
        ids = all_prompts[:case["batch"]].to(dev)
        kw = dict(max_new_tokens=new, min_new_tokens=new, eos_token_id=2, pad_token_id=0,
                  do_sample=case.get("do_sample", False), num_beams=case.get("num_beams", 1))
        if kw["do_sample"]:
            kw.update(top_p=case["top_p"], top_k=case["top_k"])
        if static:
            kw.update(cache_implementation="static",
                      compile_config=transformers.CompileConfig(mode="default", fullgraph=False))
            kw["compile_config"]._compile_all_devices = True
        streamer = FirstToken() if kw["num_beams"] == 1 else None
        torch.manual_seed(0)
        sync()
        began = time.perf_counter()
        with torch.no_grad():
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kw)
        sync()
        ended = time.perf_counter()
        if streamer is not None:
            first = (streamer.at or ended) - began
        else:  # beam search takes no streamer: time a one-token run
            one = dict(kw, max_new_tokens=1, min_new_tokens=1)
            sync()
            t = time.perf_counter()
            with torch.no_grad():
                reference.generate(ids, attention_mask=torch.ones_like(ids), **one)
            sync()
            first = time.perf_counter() - t
        return {"seconds": ended - began, "ttft": first, "tokens": out[:, ids.shape[1]:].tolist()}

    runners = {"ours": run_ours, "HF eager": lambda c: run_hf(c, False),
               "HF static+compile": lambda c: run_hf(c, True)}
    results: dict = {"model": args.model, "threads": args.threads, "device": args.device,
                     "params": sum(t.numel() for t in pytree.leaves(params)),
                     "weight_bytes": weight_bytes, "bandwidth": bandwidth, "cases": {}}
    for name in args.cases:
        case = CASES[name]
        rows = case["batch"] * case.get("num_beams", 1)
        row, best = {}, {}
        for system in args.systems:  # warm-up: compiles
            try:
                runners[system](case)
                best[system] = None
            except Exception as e:  # noqa: BLE001 - a system that cannot run this case is reported
                row[system] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        for _ in range(args.reps):  # interleaved, so load from other jobs hits every system alike
            for system in best:
                with PeakMemory(torch, cuda) as mem:
                    r = runners[system](case)
                r["peak_MB"] = mem.megabytes
                if best[system] is None or r["seconds"] < best[system]["seconds"]:
                    best[system] = r
        for system, b in best.items():
            decode_s = max(b["seconds"] - b["ttft"], 1e-9)
            row[system] = {
                "new_tok_s": case["batch"] * (new - 1) / decode_s,
                "ttft_ms": 1000 * b["ttft"],
                "prefill_tok_s": rows * args.prompt_len / b["ttft"],
                "peak_MB": b["peak_MB"],
                "bound": (new - 1) / decode_s * weight_bytes / (bandwidth["read_GBps"] * 1e9),
                "tokens": b["tokens"],
            }
        greedy = not case.get("do_sample") and case.get("num_beams", 1) == 1
        if greedy and "ours" in row and "HF eager" in row and "tokens" in row["HF eager"] \
                and "tokens" in row["ours"]:
            row["same_tokens_as_HF"] = row["ours"]["tokens"] == row["HF eager"]["tokens"]
        for r in row.values():
            if isinstance(r, dict):
                r.pop("tokens", None)
        results["cases"][name] = row

    if args.speculative:
        with torch.no_grad():  # later layers contribute little (see the module docstring)
            for layer in params["layers"][2:]:
                layer["wo"].mul_(args.deep_layer_scale)
                layer["w_down"].mul_(args.deep_layer_scale)
        draft_params = {**params, "layers": params["layers"][:2]}
        draft_config = llama.Config(**{**{f: getattr(config, f) for f in config.__dataclass_fields__},
                                       "n_layers": 2})
        backend = "inductor" if not args.eager else None
        decoder = None  # frees its packed weights: the target packs the scaled ones
        target = Decoder(params, config, backend=backend)
        draft = Decoder(draft_params, draft_config, backend=backend)
        prompts = all_prompts[:1].tolist()
        cfg = GenerateConfig(max_new_tokens=new, min_new_tokens=new, eos_token_id=2)
        runs = {"plain": lambda: (generate(target, prompts, cfg), None),
                "speculative": lambda: speculative.generate(target, draft, prompts, cfg,
                                                            draft_tokens=args.draft_tokens)}
        timings = {}
        for _ in range(args.reps + 1):  # the first round compiles
            for label, run in runs.items():
                sync()
                t = time.perf_counter()
                with torch.no_grad():
                    out, stats = run()
                sync()
                seconds = time.perf_counter() - t
                if label not in timings or seconds < timings[label][0]:
                    timings[label] = (seconds, out[0][0].output_ids, stats)
        stats = timings["speculative"][2]
        results["speculative"] = {
            "draft": f"first 2 layers, later layers x{args.deep_layer_scale}",
            "draft_tokens": args.draft_tokens,
            "tokens_per_step": stats.tokens_per_step, "acceptance": stats.acceptance_rate,
            "speedup": timings["plain"][0] / timings["speculative"][0],
            "same_tokens": timings["plain"][1] == timings["speculative"][1]}
    return results


# ---------------------------------------------------------------------------------------------
# Driver: one worker process per (model, threads), then one table


def print_table(result: dict) -> None:
    bw = result["bandwidth"]
    print(f"\n## {result['model']} ({result['params'] / 1e6:.0f}M params, "
          f"{result['weight_bytes'] / 2**20:.0f} MiB streamed per step), {result['threads']} thread(s), "
          f"{result['device']}; memory bandwidth: read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s")
    print(f"{'case':<11} {'system':<18} {'new tok/s':>10} {'TTFT ms':>9} {'prefill tok/s':>14} "
          f"{'peak MB':>8} {'bound':>6} {'vs HF best':>10}")
    for name, row in result["cases"].items():
        hf_best = max((r["new_tok_s"] for s, r in row.items() if s.startswith("HF") and isinstance(r, dict)
                       and "new_tok_s" in r), default=None)
        for system, r in row.items():
            if not isinstance(r, dict):
                continue
            if "error" in r:
                print(f"{name:<11} {system:<18} {r['error']}")
                continue
            ratio = f"{r['new_tok_s'] / hf_best:.2f}x" if hf_best and system == "ours" else ""
            print(f"{name:<11} {system:<18} {r['new_tok_s']:>10.1f} {r['ttft_ms']:>9.1f} "
                  f"{r['prefill_tok_s']:>14.1f} {r['peak_MB']:>8.1f} {100 * r['bound']:>5.0f}% {ratio:>10}")
        if "same_tokens_as_HF" in row:
            print(f"{name:<11} greedy tokens identical to HF: {row['same_tokens_as_HF']}")
    if "speculative" in result:
        s = result["speculative"]
        print(f"speculative (greedy b1, draft = {s['draft']}, k={s['draft_tokens']}): "
              f"{s['tokens_per_step']:.2f} tokens/target step, {100 * s['acceptance']:.0f}% accepted, "
              f"speed-up {s['speedup']:.2f}x over plain, same tokens: {s['same_tokens']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small,1b")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--no-speculative", dest="speculative", action="store_false")
    parser.add_argument("--deep-layer-scale", type=float, default=0.03)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eager", action="store_true", help="ours without compiling (a smoke test)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cases = args.cases.split(",")
    args.systems = args.systems.split(",")
    if args.worker:
        args.threads = int(args.threads)
        print(json.dumps(worker(args)))
        return

    results = []
    cache = tempfile.mkdtemp(prefix="bench-decode-inductor-")
    for model in args.models.split(","):
        for threads in args.threads.split(","):
            cmd = [sys.executable, __file__, "--worker", "--model", model, "--threads", threads,
                   "--cases", ",".join(args.cases), "--systems", ",".join(args.systems),
                   "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                   "--reps", str(args.reps), "--draft-tokens", str(args.draft_tokens),
                   "--deep-layer-scale", str(args.deep_layer_scale),
                   "--device", args.device] + (["--eager"] if args.eager else []) + \
                  ([] if args.speculative else ["--no-speculative"])
            env = dict(os.environ, OMP_NUM_THREADS=threads,
                       TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, f"t{threads}"))
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"{model} / {threads} thread(s) failed:\n{p.stderr[-3000:]}", file=sys.stderr)
                continue
            result = json.loads(p.stdout.strip().splitlines()[-1])
            results.append(result)
            print_table(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
