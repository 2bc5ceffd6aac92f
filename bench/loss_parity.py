"""Loss parity: `runners.pretrain` against an HF-transformers reference run, same everything.

Both runs start from the same weights (our `llama.init`, copied into `LlamaForCausalLM`), see the
same batches (the pretrain runner's own data path over the generated default corpus) and use the
same optimizer settings; the reference is the loop a user would write with HF + torch.optim.AdamW
(weight decay on matrices only, as ours), LambdaLR with our schedule, and clip_grad_norm_.

    .venv/bin/python bench/loss_parity.py --steps 100 --out runs/parity

writes <out>/ours/metrics.jsonl, <out>/hf.jsonl and <out>/parity.png, and prints the
`runners.compare_loss` summary (mean/max relative and absolute error).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib import config as config_lib  # noqa: E402
from lib import optim  # noqa: E402
from lib.data import batches, build_datasets  # noqa: E402
from models import hf, llama  # noqa: E402
from runners import compare_loss, pretrain  # noqa: E402


def hf_reference(cfg: pretrain.PretrainConfig, out: Path) -> None:
    from transformers import LlamaForCausalLM
    from transformers import LlamaConfig

    model_cfg, train, opt = cfg.model, cfg.train, cfg.optim
    params = llama.init(model_cfg, train.seed)
    hf_config = LlamaConfig(**{k: v for k, v in hf.config_to_hf(model_cfg).items()
                               if k not in ("architectures", "torch_dtype", "model_type")})
    model = LlamaForCausalLM(hf_config)
    model.load_state_dict(hf.state_dict_from_params(model_cfg, params), strict=True)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        adamw, lambda step: float(optim.learning_rate(opt, step)) / opt.lr)
    sets = build_datasets(cfg.data, {"train": train.steps * train.global_batch},
                          max_seq_len=model_cfg.max_seq_len, vocab_size=model_cfg.vocab_size)
    with open(out, "w") as f:
        for step, batch in enumerate(batches(sets["train"], train.global_batch, 0, 0, 1), 1):
            if step > train.steps:
                break
            logits = model(input_ids=batch["tokens"]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                                   ignore_index=llama.IGNORE_INDEX)
            adamw.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
            adamw.step()
            schedule.step()
            f.write(json.dumps({"step": step, "loss": loss.item(),
                                "grad_norm": grad_norm.item()}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default="runs/parity")
    ap.add_argument("--compile", action="store_true", help="compile our train step")
    args = ap.parse_args()
    out = Path(args.out)
    overrides = [f"train.steps={args.steps}", "train.log_every=1", "train.eval_every=0",
                 f"train.step.compile={'true' if args.compile else 'false'}",
                 f"optim.decay_steps={args.steps}", f"out_dir={out / 'ours'}",
                 "checkpoint.every=1000000", "train.attention=reference"]
    torch.manual_seed(0)
    pretrain.main(overrides)
    cfg = pretrain.with_defaults(config_lib.parse_argv(pretrain.PretrainConfig, overrides))
    hf_reference(cfg, out / "hf.jsonl")
    ours = compare_loss.read_metric(out / "ours" / "metrics.jsonl", "loss")
    ref = compare_loss.read_metric(out / "hf.jsonl", "loss")
    cmp = compare_loss.compare(ours, ref)
    compare_loss.plot(cmp, ("llamax (runners.pretrain)", "HF transformers + torch AdamW"),
                      "loss", out / "parity.png")
    print(json.dumps({"steps": args.steps, "first_loss": ref[min(ref)], "last_loss": ref[max(ref)],
                      "mean_rel_err": cmp.mean_rel, "max_rel_err": cmp.max_rel,
                      "mean_abs_err": cmp.mean_abs, "max_abs_err": cmp.max_abs}, indent=1))
    assert math.isfinite(cmp.mean_rel)


if __name__ == "__main__":
    main()
