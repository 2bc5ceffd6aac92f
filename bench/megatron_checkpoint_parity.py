"""Megatron checkpoints written here against megatron-core's own models, and the reverse.

    /work/venvs/megatron/bin/python bench/megatron_checkpoint_parity.py --ours-python .venv/bin/python \
        [--megatron-lm SRC]

Run with a Python that has megatron-core (0.16.1 was used; CI has none, so this is not a test).
Our side (models.megatron, llama.forward) runs in subprocesses under `--ours-python`, the
project's venv; megatron's runs here, on the CPU, with gloo (world size 1, or 2 for TP 2).

For tiny LLaMA shapes (GQA untied with a padded vocabulary, MHA tied, MQA, LLaMA-3.1 rope
scaling) it compares fp32 logits over the real vocabulary:
  ours -> megatron: `models.megatron.save` writes TP 1 and TP 2 checkpoints; megatron-core's
     GPTModel (local layer spec) loads each rank's file with load_state_dict(strict=True) and
     runs it (TP 2 on two processes). "mcore" (TransformerEngine) names are loaded after
     megatron-core's own TE -> local renaming hook (modelopt's state_dict pre-hook).
  megatron -> ours: GPTModel's own random init (TP 1, and TP 2 as megatron-core shards it) is
     saved in the Megatron file layout and read back by `models.megatron.load`.
With `--megatron-lm SRC` (a Megatron-LM source tree holding megatron/training and
megatron/legacy, e.g. `git archive core_v0.16.1 megatron/training megatron/legacy`), the same
two directions run for the legacy layout with Megatron-LM's legacy GPTModel, built from
Megatron-LM's own argument parser, whose real `args` namespace is saved in the files. That
legacy attention at core_v0.16.1 reshapes queries with `.view`, which only works for MHA and
MQA, so the GQA shapes skip it. Modules that path imports but never uses (six, regex,
triton kernels, megatron.rl) are stubbed when absent, and validate_args's question about the GPU
architecture (for a performance warning) answers Hopper.
It prints the max |difference| of each pair and exits 1 if any is above 1e-5.

Harness shims let megatron's GPU-minded code run on a CPU without changing what it computes:
`torch.cuda.current_device()` answers "cpu" (RoPE moves its inverse frequencies there) and the
CUDA RNG tracker's fork is a no-op (it only scopes dropout, which is 0 in eval mode).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5
SEQ = 12
_BASE = dict(dim=64, n_layers=2, n_heads=4, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=64)
CASES = {  # name: (our llama.Config fields, TP sizes, runs on Megatron-LM's legacy model)
    "gqa-untied-padded-vocab": (dict(_BASE, vocab_size=500, n_kv_heads=2, ffn_dim=176, tie_embeddings=False),
                                (1, 2), False),
    "mha-tied": (dict(_BASE, vocab_size=512, n_kv_heads=None, ffn_dim=128, norm_eps=1e-6, tie_embeddings=True),
                 (1, 2), True),
    # Megatron-LM's legacy model ignores --rotary-base (always 10000; ModelLink's honours it).
    "mqa-untied": (dict(_BASE, vocab_size=300, n_kv_heads=1, ffn_dim=160, tie_embeddings=False), (1,), True),
    "llama3.1-rope-scaling": (dict(_BASE, vocab_size=384, n_kv_heads=2, ffn_dim=192, rope_theta=500000.0,
                                   tie_embeddings=False,
                                   rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position": 8192}), (1, 2), False),
}
OUR_LAYOUTS = ("mcore-local", "mcore", "legacy")


def tokens_for(fields: dict) -> torch.Tensor:
    return torch.randint(0, fields["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(7))


def _padded(vocab: int, tp: int) -> int:
    multiple = 128 * tp  # Megatron's default --make-vocab-size-divisible-by
    return -(-vocab // multiple) * multiple


# ---------------------------------------------------------------------------------------------
# Our side (project venv)


def ours_write(root: Path) -> None:
    from lib import config as config_lib
    from models import llama, megatron

    for name, (fields, tps, _) in CASES.items():
        config = config_lib.from_dict(llama.Config, fields, "model")
        params = llama.init(config, seed=1)
        g = torch.Generator().manual_seed(2)
        for layer in params["layers"]:  # norms away from 1 so a swapped norm shows
            for key in ("attn_norm", "mlp_norm"):
                layer[key] = 1 + 0.2 * torch.randn(layer[key].shape, generator=g)
        params["final_norm"] = 1 + 0.2 * torch.randn(config.dim, generator=g)
        for layout in OUR_LAYOUTS:
            for tp in tps:
                megatron.save(root / name / f"ours-{layout}-tp{tp}", config, params, tensor_parallel=tp, layout=layout)
        with torch.no_grad():
            torch.save(llama.forward(params, tokens_for(fields), config), root / name / "ours-logits.pt")


def ours_read(root: Path) -> None:
    from models import llama, megatron

    results = {}
    for name, (fields, _, _) in CASES.items():
        for ckpt in sorted((root / name).glob("megatron-*-tp?")):
            config, params = megatron.load(ckpt)
            with torch.no_grad():
                ours = llama.forward(params, tokens_for(fields), config)
            theirs = torch.load(ckpt.parent / f"{ckpt.name}-logits.pt")
            kind, tp = ckpt.name.split("-")[1], ckpt.name.rsplit("tp", 1)[1]
            what = f"{name:22s} {'megatron-core GPTModel' if kind == 'mcore' else 'Megatron-LM legacy GPTModel'}" \
                   f" TP{tp} init -> models.megatron.load"
            v = fields["vocab_size"]  # (a NullTokenizer run adds an EOD id: the model has one more row)
            results[what] = (ours[..., :v] - theirs[..., :v]).abs().max().item()
    print(json.dumps(results))


# ---------------------------------------------------------------------------------------------
# Megatron's side (megatron venv)


def _shim_cpu() -> None:
    torch.cuda.current_device = lambda: "cpu"
    from megatron.core.tensor_parallel import random as mp_random
    mp_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()


def _core_gpt(fields: dict, tp: int):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=fields["n_layers"], hidden_size=fields["dim"], num_attention_heads=fields["n_heads"],
        num_query_groups=fields["n_kv_heads"] or fields["n_heads"], ffn_hidden_size=fields["ffn_dim"],
        normalization="RMSNorm", layernorm_epsilon=fields["norm_eps"], gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, use_cpu_initialization=True, persist_layer_norm=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False)
    scaling = fields.get("rope_scaling")
    return GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=_padded(fields["vocab_size"], tp), max_sequence_length=fields["max_seq_len"],
                    position_embedding_type="rope", rotary_base=int(fields["rope_theta"]),
                    rope_scaling=scaling is not None, rope_scaling_factor=scaling["factor"] if scaling else 8.0,
                    share_embeddings_and_output_weights=fields["tie_embeddings"], parallel_output=False).eval()


def _core_args(fields: dict, tp: int) -> argparse.Namespace:
    """What Megatron's training saves in `args` for this model (the fields a reader needs)."""
    scaling = fields.get("rope_scaling")
    return argparse.Namespace(
        num_layers=fields["n_layers"], hidden_size=fields["dim"], num_attention_heads=fields["n_heads"],
        num_query_groups=fields["n_kv_heads"] or fields["n_heads"],
        group_query_attention=bool(fields["n_kv_heads"]), ffn_hidden_size=fields["ffn_dim"],
        normalization="RMSNorm", norm_epsilon=fields["norm_eps"], swiglu=True, add_bias_linear=False,
        position_embedding_type="rope", rotary_base=int(fields["rope_theta"]),
        use_rope_scaling=scaling is not None, rope_scaling_factor=scaling["factor"] if scaling else 8.0,
        max_position_embeddings=fields["max_seq_len"], seq_length=fields["max_seq_len"],
        untie_embeddings_and_output_weights=not fields["tie_embeddings"],
        vocab_size=fields["vocab_size"], padded_vocab_size=_padded(fields["vocab_size"], tp),
        make_vocab_size_divisible_by=128, tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
        use_legacy_models=False, ckpt_format="torch")


def _import_megatron_training(src: str) -> None:
    sys.path.insert(0, src)  # megatron is a namespace package: megatron.training joins megatron.core

    class Unused(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    for module in ("six", "regex", "megatron.core.transformer.custom_layers.batch_invariant_kernels",
                   "megatron.rl", "megatron.rl.parallel_utils"):
        try:
            __import__(module)
        except ImportError:
            sys.modules[module] = Unused(module)
    # validate_args asks the GPU's architecture to word a performance warning (TP > 1).
    from megatron.training import arguments, utils
    arguments.get_device_arch_version = utils.get_device_arch_version = lambda: 9


def _legacy_gpt(fields: dict, tp: int, padded_vocab: int):
    """Megatron-LM's legacy GPTModel, configured by Megatron-LM's own argument parser."""
    from megatron.core.enums import ModelType
    from megatron.legacy.model import GPTModel
    from megatron.training.arguments import core_transformer_config_from_args, parse_args, validate_args
    from megatron.training.global_vars import set_args

    f = fields
    argv = ["--num-layers", f["n_layers"], "--hidden-size", f["dim"], "--num-attention-heads", f["n_heads"],
            "--ffn-hidden-size", f["ffn_dim"], "--seq-length", SEQ, "--max-position-embeddings", f["max_seq_len"],
            "--tensor-model-parallel-size", tp, "--micro-batch-size", 1, "--global-batch-size", 1,
            "--position-embedding-type", "rope", "--rotary-base", int(f["rope_theta"]),
            "--normalization", "RMSNorm", "--norm-epsilon", f["norm_eps"], "--swiglu", "--disable-bias-linear",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", f["vocab_size"], "--mock-data",
            "--train-iters", 1, "--lr", 1e-4, "--use-cpu-initialization", "--use-legacy-models",
            "--transformer-impl", "local", "--ckpt-format", "torch", "--no-gradient-accumulation-fusion",
            "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion",
            "--no-persist-layer-norm", "--attention-dropout", 0, "--hidden-dropout", 0]
    if f["n_kv_heads"]:
        argv += ["--group-query-attention", "--num-query-groups", f["n_kv_heads"]]
    if not f["tie_embeddings"]:
        argv.append("--untie-embeddings-and-output-weights")
    saved_argv = sys.argv
    sys.argv = ["pretrain_gpt.py", *map(str, argv)]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            args = validate_args(parse_args())
    finally:
        sys.argv = saved_argv
    args.model_type = ModelType.encoder_or_decoder  # as megatron.training.pretrain sets it
    args.padded_vocab_size = padded_vocab  # what build_tokenizer sets from the run's tokenizer
    if not hasattr(args, "apply_layernorm_1p"):  # read by the legacy norm, no longer parsed at 0.16
        args.apply_layernorm_1p = False
    set_args(args)
    model = GPTModel(core_transformer_config_from_args(args), num_tokentypes=0, parallel_output=False,
                     pre_process=True, post_process=True)
    return model.eval(), args


def _forward(model, fields: dict) -> torch.Tensor:
    tokens = tokens_for(fields)
    positions = torch.arange(SEQ).expand(tokens.shape)
    causal = torch.triu(torch.ones(SEQ, SEQ), diagonal=1).bool()[None, None]  # True = masked
    with torch.no_grad():
        return model(tokens, positions, causal).float()


def _perturb_norms(model) -> None:
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # norms away from 1, as on our side
        for key, p in model.named_parameters():
            if "norm" in key:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))


def _worker(rank: int, tp: int, root: str, port: int, megatron_lm: str | None, results: dict) -> None:
    """One rank of a world of `tp` processes: every comparison at this TP size."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.post_training.modelopt.gpt.state_dict_hooks import mcore_gpt_load_te_state_dict_pre_hook

    torch.set_num_threads(1)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # the TE renaming hook logs every key
    _shim_cpu()
    # CUDA_DEVICE_MAX_CONNECTIONS=1: what Megatron-LM's launch scripts export (validate_args checks it)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(tp),
                      CUDA_DEVICE_MAX_CONNECTIONS="1")
    dist.init_process_group("gloo", rank=rank, world_size=tp)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    if megatron_lm:
        _import_megatron_training(megatron_lm)
        from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator
        init_num_microbatches_calculator(rank, None, 1, 1, 1)
    root = Path(root)
    rank_dir = f"mp_rank_{rank:02d}"

    def ours_state(name: str, layout: str) -> dict:
        file = root / name / f"ours-{layout}-tp{tp}" / "iter_0000001" / rank_dir / "model_optim_rng.pt"
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(file, map_location="cpu", weights_only=True)["model"]

    def save_theirs(name: str, kind: str, model, args) -> None:
        logits = _forward(model, fields)
        out = root / name / f"megatron-{kind}-tp{tp}"
        file = out / "iter_0000001" / rank_dir / "model_optim_rng.pt"
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 1,
                    "model": model.state_dict_for_save_checkpoint()}, file)
        if rank == 0:
            (out / "latest_checkpointed_iteration.txt").write_text("1")
            torch.save(logits, out.parent / f"{out.name}-logits.pt")

    def record(what: str, model, ours: torch.Tensor) -> None:
        diff = (_forward(model, fields)[..., :fields["vocab_size"]] - ours).abs().max().item()
        if rank == 0:
            results[what] = diff

    try:
        for name, (fields, tps, legacy_ok) in CASES.items():
            if tp not in tps:
                continue
            ours = torch.load(root / name / "ours-logits.pt")
            for layout in ("mcore-local", "mcore"):
                state = dict(ours_state(name, layout))
                if layout == "mcore":
                    # megatron-core's own TE -> local renaming; TE's attention extra state has no
                    # local counterpart.
                    mcore_gpt_load_te_state_dict_pre_hook(state, "", {}, True, [], [], [])
                    state = {k: v for k, v in state.items() if "core_attention._extra_state" not in k}
                model = _core_gpt(fields, tp)
                model.load_state_dict(state, strict=True)
                record(f"{name:22s} models.megatron.save {layout} TP{tp} -> megatron-core GPTModel", model, ours)
            torch.manual_seed(3)
            model = _core_gpt(fields, tp)
            _perturb_norms(model)
            save_theirs(name, "mcore", model, _core_args(fields, tp))

            if megatron_lm and legacy_ok:
                # A run whose tokenizer has the model's vocabulary pads it as our files say.
                model, _ = _legacy_gpt(fields, tp, _padded(fields["vocab_size"], tp))
                model.load_state_dict(ours_state(name, "legacy"), strict=True)
                record(f"{name:22s} models.megatron.save legacy TP{tp} -> Megatron-LM legacy GPTModel", model, ours)
                torch.manual_seed(3)
                # Megatron's NullTokenizer has --vocab-size ids plus an EOD id.
                model, args = _legacy_gpt(fields, tp, _padded(fields["vocab_size"] + 1, tp))
                _perturb_norms(model)
                save_theirs(name, "legacy", model, args)
    finally:
        dist.destroy_process_group()


def _ours(python: str, role: str, root: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([python, __file__, "--role", role, str(root)], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{role} failed:\n{done.stderr}")
    return done.stdout


def megatron_side(root: Path, ours_python: str, megatron_lm: str | None) -> int:
    import torch.multiprocessing as mp

    _ours(ours_python, "ours-write", root)
    results = {}
    for i, tp in enumerate(sorted({tp for _, tps, _ in CASES.values() for tp in tps})):
        shared = mp.Manager().dict()
        mp.spawn(_worker, args=(tp, str(root), 29731 + i, megatron_lm, shared), nprocs=tp, join=True)
        results.update(sorted(shared.items()))
    results.update(json.loads(_ours(ours_python, "ours-read", root).strip().splitlines()[-1]))
    for what, diff in results.items():
        print(f"{what}: max |logits diff| {diff:.2e}")
    worst = max(results.values())
    print(f"{len(results)} comparisons, worst max |logits diff| {worst:.2e} "
          f"({'within' if worst <= TOLERANCE else 'ABOVE'} {TOLERANCE:g})"
          + ("" if megatron_lm else "; legacy layout not run (no --megatron-lm)"))
    return 0 if worst <= TOLERANCE else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ours-python", default=str(REPO / ".venv" / "bin" / "python"),
                        help="python of the project's venv (runs models.megatron)")
    parser.add_argument("--megatron-lm", help="Megatron-LM source tree with megatron/training and megatron/legacy")
    parser.add_argument("--role", choices=("ours-write", "ours-read"), help=argparse.SUPPRESS)
    parser.add_argument("dir", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "ours-write":
        ours_write(Path(args.dir))
        return 0
    if args.role == "ours-read":
        ours_read(Path(args.dir))
        return 0
    os.environ["PYTHONWARNINGS"] = "ignore"  # megatron warns that TransformerEngine/Apex are absent
    import warnings
    warnings.filterwarnings("ignore")
    from megatron.core import __version__
    print(f"megatron-core {__version__}, torch {torch.__version__}, CPU, gloo")
    with tempfile.TemporaryDirectory() as tmp:
        return megatron_side(Path(tmp), args.ours_python, args.megatron_lm and str(Path(args.megatron_lm).resolve()))


if __name__ == "__main__":
    sys.exit(main())
