"""Convert checkpoints between Hugging Face, Megatron and this project, and merge LoRA adapters.

    python -m runners.convert hf-to-native --input HF_DIR --output CKPT_DIR
    python -m runners.convert native-to-hf --input CKPT_DIR --output HF_DIR
    python -m runners.convert merge-lora --base HF_DIR --lora A [--lora B ...] --output HF_DIR
    python -m runners.convert native-to-megatron --input CKPT_DIR --output MEGATRON_DIR \
        --target-tensor-parallel-size 8 --target-pipeline-parallel-size 1 --layout legacy
    python -m runners.convert megatron-to-native --input MEGATRON_DIR --output CKPT_DIR
    (also hf-to-megatron, megatron-to-hf, and megatron-to-megatron to change TP/PP or layout)

"native" is the orbax training checkpoint of `lib.checkpoint` (a root of `<step>/` dirs); a
converted model is step 0 holding {"params": ...}, with the model config in its `extra` JSON.
"megatron" is Megatron-LM / ModelLink / MindSpeed-LLM's `iter_N/mp_rank_TT[_PPP]` layout
(`models.megatron`); its model config comes from the files' args (`--set field=value` adds or
replaces fields, e.g. `--set vocab_size=32000` to drop the vocabulary padding).
merge-lora folds PEFT adapters into the base in order, resizing the vocabulary to each adapter's
own (Chinese-LLaMA-Alpaca style), and copies the tokenizer of the last adapter that has one.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from lib import checkpoint, cli, dtypes
from lib import config as config_lib
from lib.errors import UserError
from models import checkpoints, hf, llama, megatron, peft

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")


def _check_output_free(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"--output {path} already exists and is not empty; choose a new directory")


def _save_native(output_dir: Path, config: llama.Config, params: llama.Params, source: Path) -> None:
    ckpt = checkpoint.Checkpointer(checkpoint.CheckpointConfig(dir=str(output_dir), keep=1, async_save=False))
    try:
        ckpt.save(0, {"params": params}, {checkpoints.MODEL_KEY: config_lib.to_dict(config),
                                          "converted_from": str(source)}, force=True)
    finally:
        ckpt.close()


def hf_to_native(input_dir: Path, output_dir: Path, dtype: torch.dtype | None) -> None:
    _check_output_free(output_dir)
    config, params = hf.load(input_dir, dtype=dtype)
    _save_native(output_dir, config, params, input_dir)
    print(f"wrote native checkpoint {output_dir} (step 0) from {input_dir}")


def native_to_hf(input_dir: Path, output_dir: Path, dtype: torch.dtype | None, model: str | None) -> None:
    if checkpoints.checkpoint_kind(input_dir) == "hf":
        raise UserError(f"{input_dir}: not a native checkpoint, no <step>/state inside (it is an HF "
                        "model directory already)")
    _check_output_free(output_dir)
    expected = config_lib.from_dict(llama.Config, model, "--model") if model is not None else None
    target_dtype = dtype or torch.float32
    streamed = checkpoints.stream_native(input_dir, dtype=target_dtype, config=expected)
    if streamed is not None:
        # Read a group of tensors at a time and write each as it comes: never the whole model.
        config, tensors = streamed
        hf.save_tensors(output_dir, config, tensors, target_dtype)
        print(f"wrote HF model {output_dir} from native checkpoint {input_dir}")
        return
    # A LoRA run's checkpoint: its adapters merge into the base model, read whole.
    config, params, lora_cfg = checkpoints.load_pretrained(
        input_dir, dtype=target_dtype, merge_adapter=True, config=expected)
    hf.save(output_dir, config, params, dtype=dtype)
    print(f"wrote HF model {output_dir} from native checkpoint {input_dir} (its LoRA adapters, "
          f"r={lora_cfg.r}, merged into the base model it was trained on)")


def _read_model(kind: str, path: Path, dtype: torch.dtype | None,
                args: argparse.Namespace) -> tuple[llama.Config, llama.Params, int | None]:
    """(config, params, Megatron iteration or None) from an "hf", "native" or "megatron" source."""
    if kind == "hf":
        return *hf.load(path, dtype=dtype), None
    if kind == "native":
        expected = config_lib.from_dict(llama.Config, args.model, "--model") if args.model is not None else None
        config, params, _ = checkpoints.load_pretrained(path, dtype=dtype or torch.float32,
                                                        merge_adapter=True, config=expected)
        return config, params, None
    overrides = config_lib.apply_overrides({}, args.set or [])
    config, tensors, info = megatron.read(path, overrides)
    print(f"read {info.layout} Megatron checkpoint {info.iteration_dir} (TP {info.tensor_parallel}, "
          f"PP {info.pipeline_parallel}" + (f", {info.virtual_stages} virtual stages" if info.virtual_stages > 1 else "")
          + ")")
    return config, hf.params_from_state_dict(config, tensors, str(info.iteration_dir), dtype=dtype), info.iteration


def _virtual_stages(config: llama.Config, args: argparse.Namespace) -> int:
    per_stage = args.num_layers_per_virtual_pipeline_stage
    if per_stage is None:
        return 1
    stages = args.target_pipeline_parallel_size
    if per_stage < 1 or config.n_layers % (stages * per_stage):
        raise UserError(f"--num-layers-per-virtual-pipeline-stage {per_stage}: {config.n_layers} layers cannot "
                        f"be split into {stages} pipeline stage(s) of chunks of {per_stage} layers")
    return config.n_layers // (stages * per_stage)


def convert(source: str, target: str, args: argparse.Namespace) -> None:
    """The conversions that involve Megatron: any of hf / native / megatron to any other (or itself)."""
    input_dir, output_dir = _existing_dir(args.input), Path(args.output)
    _check_output_free(output_dir)
    dtype = dtypes.torch_dtype(args.dtype) if args.dtype else None
    config, params, iteration = _read_model(source, input_dir, dtype, args)
    if target == "native":
        _save_native(output_dir, config, params, input_dir)
        what = "native checkpoint (step 0)"
    elif target == "hf":
        hf.save(output_dir, config, params, dtype=dtype)
        what = "HF model"
    else:
        tp, pp = args.target_tensor_parallel_size, args.target_pipeline_parallel_size
        megatron.save(output_dir, config, params, tensor_parallel=tp, pipeline_parallel=pp,
                      virtual_stages=_virtual_stages(config, args), layout=args.layout, dtype=dtype,
                      vocab_multiple=args.make_vocab_size_divisible_by, iteration=iteration or 1)
        what = f"{args.layout} Megatron checkpoint (TP {tp}, PP {pp})"
    print(f"wrote {what} {output_dir} from {input_dir}")


def merge_lora(base: Path, adapters: list[Path], output_dir: Path, dtype: torch.dtype | None) -> None:
    _check_output_free(output_dir)
    config, params = hf.load(base, dtype=dtype)
    vocab_before = config.vocab_size
    config, params = peft.merge_adapters(config, params, adapters)
    if config.vocab_size != vocab_before:
        print(f"vocabulary resized {vocab_before} -> {config.vocab_size}")
    tokenizer_dir = next((d for d in reversed([base, *adapters])
                          if any((d / f).is_file() for f in TOKENIZER_FILES)), None)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".partial", dir=output_dir.parent))
    try:
        hf.save(staging / "model", config, params, dtype=dtype)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copy2(tokenizer_dir / name, staging / "model" / name)
        if output_dir.exists():
            output_dir.rmdir()  # checked empty above
        (staging / "model").rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    source = f"; tokenizer from {tokenizer_dir}" if tokenizer_dir else "; no tokenizer files found"
    print(f"wrote merged HF model {output_dir} ({len(adapters)} adapter(s){source})")


def _existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise UserError(f"{text} is not a directory")
    return path


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dtype_help = "cast weights to this dtype (default: keep the stored dtype)"

    p = sub.add_parser("hf-to-native", help="HF LlamaForCausalLM directory -> native checkpoint")
    p.add_argument("--input", required=True, help="HF model directory")
    p.add_argument("--output", required=True, help="new checkpoint directory")
    p.add_argument("--dtype", choices=dtypes.TORCH_NAMES, help=dtype_help)

    p = sub.add_parser("native-to-hf", help="native checkpoint -> HF directory (transformers loads it)")
    p.add_argument("--input", required=True, help="checkpoint root (latest step) or one <step> dir")
    p.add_argument("--output", required=True, help="new HF model directory")
    p.add_argument("--dtype", choices=dtypes.TORCH_NAMES, help="dtype of the written weights (default: float32)")
    p.add_argument("--model", help="model preset, when the checkpoint does not record its config")

    p = sub.add_parser("merge-lora", help="fold PEFT LoRA adapters (in order) into an HF model")
    p.add_argument("--base", required=True, help="HF model directory")
    p.add_argument("--lora", required=True, action="append", help="PEFT adapter directory (repeatable)")
    p.add_argument("--output", required=True, help="new HF model directory")
    p.add_argument("--dtype", choices=dtypes.TORCH_NAMES, help=dtype_help)

    names = {"hf": "HF LlamaForCausalLM directory", "native": "native checkpoint",
             "megatron": "Megatron-LM / ModelLink checkpoint"}
    for source, target in (("megatron", "native"), ("native", "megatron"), ("megatron", "hf"),
                           ("hf", "megatron"), ("megatron", "megatron")):
        p = sub.add_parser(f"{source}-to-{target}", help=f"{names[source]} -> {names[target]}")
        p.add_argument("--input", required=True, help={
            "hf": "HF model directory", "native": "checkpoint root (latest step) or one <step> dir",
            "megatron": "checkpoint root (the iteration its tracker names) or one iter_N / release dir"}[source])
        p.add_argument("--output", required=True, help="new directory")
        p.add_argument("--dtype", choices=dtypes.TORCH_NAMES, help=dtype_help)
        if source == "native":
            p.add_argument("--model", help="model preset, when the checkpoint does not record its config")
        if source == "megatron":
            p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                           help="model config field the args lack or get wrong (repeatable), e.g. vocab_size=32000")
        if target == "megatron":
            p.add_argument("--target-tensor-parallel-size", type=int, default=1)
            p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
            p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int,
                           help="interleaved pipeline: layers per model chunk")
            p.add_argument("--layout", required=True, choices=sorted(megatron.LAYOUTS),
                           help="legacy: megatron/legacy and ModelLink legacy; mcore: megatron-core with "
                                "TransformerEngine; mcore-local: megatron-core's local spec, ModelLink / "
                                "MindSpeed-LLM mcore")
            p.add_argument("--make-vocab-size-divisible-by", type=int, default=megatron.DEFAULT_VOCAB_MULTIPLE,
                           help="as the training run that loads it sets it (Megatron's default: 128)")

    args = parser.parse_args(argv)
    dtype = dtypes.torch_dtype(args.dtype) if args.dtype else None
    source, _, target = args.command.partition("-to-")
    if "megatron" in (source, target):
        convert(source, target, args)
    elif args.command == "hf-to-native":
        hf_to_native(_existing_dir(args.input), Path(args.output), dtype)
    elif args.command == "native-to-hf":
        native_to_hf(_existing_dir(args.input), Path(args.output), dtype, args.model)
    else:
        merge_lora(_existing_dir(args.base), [_existing_dir(d) for d in args.lora], Path(args.output), dtype)
    return 0


if __name__ == "__main__":
    cli.run(main)
