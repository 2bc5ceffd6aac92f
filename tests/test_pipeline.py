"""Pipeline parallel: stage layout and bad input in one process; training on 2 and 4 processes
(tests/pipe_worker.py) against single-device eager torch (autograd + torch.optim.AdamW).

Tolerances (fp32): gradients, gradient norm and parameters within 1e-6 absolute; the losses
(train and eval) within 1e-6 relative (they are ~6.2, where one float32 ulp is 4.8e-7: summing
per micro-batch moves the last bits). bf16/fp16 runs: see LOW_PRECISION.
"""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lib import config as config_lib
from lib import pytree
from lib.errors import UserError
from models import llama
from parallel import pipeline, sharding
from parallel.mesh import MeshConfig, require_no_stages
from parallel.pipeline import PipelineConfig
from tests.launch import spawn_ranks

WORKER = Path(__file__).resolve().parent / "pipe_worker.py"
MODEL = llama.Config(vocab_size=128, dim=32, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=64,
                     max_seq_len=32)
TOL = 1e-6


# ---------------------------------------------------------------------------------------------
# One process


def test_even_and_configured_layouts():
    plan = pipeline.layout(PipelineConfig(), 6, pipe=3)
    assert plan.layers == (range(0, 2), range(2, 4), range(4, 6))
    plan = pipeline.layout(PipelineConfig(layers_per_stage=(1, 3, 2)), 6, pipe=3)
    assert plan.layers == (range(0, 1), range(1, 4), range(4, 6))
    # Interleaved: 2 ranks x 3 virtual stages; rank 0 holds stages 0, 2, 4.
    plan = pipeline.layout(PipelineConfig(schedule="Interleaved1F1B", virtual_stages=3), 6, pipe=2)
    assert plan.n_stages == 6 and plan.stages_of(0) == [0, 2, 4] and plan.stages_of(1) == [1, 3, 5]
    assert [plan.rank_of(s) for s in range(6)] == [0, 1, 0, 1, 0, 1]


def test_bad_pipeline_input_names_the_values():
    with pytest.raises(UserError, match=r"model.n_layers=6 is not divisible by mesh.pipe=4"):
        pipeline.layout(PipelineConfig(), 6, pipe=4)
    with pytest.raises(UserError, match=r"mesh.pipe=2 x pipeline.virtual_stages=2 = 4 stages"):
        pipeline.layout(PipelineConfig(schedule="Interleaved1F1B", virtual_stages=2), 6, pipe=2)
    with pytest.raises(UserError, match=r"layers_per_stage=\[2, 2\] sums to 4, but model.n_layers=6"):
        pipeline.layout(PipelineConfig(layers_per_stage=(2, 2)), 6, pipe=2)
    with pytest.raises(UserError, match=r"has 3 entries; mesh.pipe=2 needs 2"):
        pipeline.layout(PipelineConfig(layers_per_stage=(2, 2, 2)), 6, pipe=2)
    with pytest.raises(UserError, match=r"stage 1 has no layers"):
        pipeline.layout(PipelineConfig(layers_per_stage=(3, 0, 3)), 6, pipe=3)
    with pytest.raises(UserError, match=r"train.step.micro_batches=2 is fewer than mesh.pipe=4"):
        pipeline.check(PipelineConfig(schedule="1F1B"), dataclasses.replace(MODEL, n_layers=4), 4, 2)
    pipeline.check(PipelineConfig(schedule="GPipe"), dataclasses.replace(MODEL, n_layers=4), 4, 2)
    with pytest.raises(UserError, match=r"tie_embeddings=true with mesh.pipe=2"):
        pipeline.check(PipelineConfig(), dataclasses.replace(MODEL, tie_embeddings=True), 2, 2)
    with pytest.raises(UserError, match=r"micro_batches=9: Interleaved1F1B runs them in 4 rounds"):
        pipeline.check(PipelineConfig(schedule="Interleaved1F1B"), MODEL, 2, 9)
    with pytest.raises(UserError, match=r"rule 'heads' -> 'pipe'"):
        sharding.logical_axis_rules([["heads", "pipe"]])


def test_config_errors_name_key_and_value():
    cls = config_lib.ConfigError
    with pytest.raises(cls, match=r"pipeline.schedule: expected one of \['GPipe', '1F1B', "
                                  r"'Interleaved1F1B'\], got 'ZeroBubble'"):
        config_lib.from_dict(Holder, {"pipeline": {"schedule": "ZeroBubble"}})
    with pytest.raises(cls, match=r"pipeline.virtual_stages=2 needs schedule=Interleaved1F1B"):
        config_lib.from_dict(Holder, {"pipeline": {"virtual_stages": 2}})
    with pytest.raises(cls, match=r"pipeline.virtual_stages=0 must be >= 1"):
        config_lib.from_dict(Holder, {"pipeline": {"virtual_stages": 0, "schedule": "Interleaved1F1B"}})
    assert MeshConfig(pipe=-1, fsdp=1, tensor=2).resolve(8)["pipe"] == 4


def test_runners_without_stages_refuse_pipe():
    require_no_stages(MeshConfig(fsdp=2), "runners.evaluate")
    with pytest.raises(UserError, match=r"mesh.pipe=2: runners.evaluate runs the whole model"):
        require_no_stages(MeshConfig(pipe=2), "runners.evaluate")


@dataclasses.dataclass(frozen=True)
class Holder:
    pipeline: PipelineConfig = PipelineConfig()


def test_stages_compose_to_the_whole_model():
    """Each rank's parameters keep the full model's paths, every parameter is held by exactly
    one stage, and running the stages one after the other gives the model's logits."""
    params = llama.init(MODEL, seed=0)
    tokens = torch.randint(0, MODEL.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    for cfg, pipe in [(PipelineConfig(layers_per_stage=(0, 4, 2)), 3),
                      (PipelineConfig(schedule="Interleaved1F1B", virtual_stages=3), 2)]:
        plan = pipeline.layout(cfg, MODEL.n_layers, pipe)
        held = [pytree.flatten_by_path(pipeline.select(params, plan, plan.stages_of(r)))
                for r in range(pipe)]
        paths = [p for h in held for p in h]
        assert sorted(paths) == sorted(pytree.flatten_by_path(params)) and len(paths) == len(set(paths))
        x = tokens
        for s in range(plan.n_stages):
            mine = pipeline.select(params, plan, plan.stages_of(plan.rank_of(s)))
            x = pipeline.stage_function(MODEL, plan, s)(mine, x)
        torch.testing.assert_close(x, llama.forward(params, tokens, MODEL), rtol=0, atol=0)


def test_bubble_and_in_flight_micro_batches():
    assert pipeline.bubble_fraction("1F1B", pipe=4, micro_batches=8) == pytest.approx(3 / 11)
    assert pipeline.bubble_fraction("GPipe", pipe=4, micro_batches=8) == pytest.approx(3 / 11)
    assert pipeline.bubble_fraction("Interleaved1F1B", 4, 8, virtual_stages=2) == pytest.approx(3 / 22)
    assert pipeline.bubble_fraction("1F1B", pipe=1, micro_batches=8) == 0.0
    assert pipeline.in_flight("GPipe", 4, 8) == 8
    assert [pipeline.in_flight("1F1B", 4, 8, rank=r) for r in range(4)] == [4, 3, 2, 1]
    # torch's Interleaved1F1B warm-up: (v - 1) * 4 micro-batches per round + 2 per hop to the end
    assert [pipeline.in_flight("Interleaved1F1B", 4, 8, 2, r) for r in range(4)] == [11, 9, 7, 5]


# ---------------------------------------------------------------------------------------------
# Several processes


def spawn(world_size: int, cases: list[str], tmp_path: Path, timeout: int = 600) -> dict:
    out = tmp_path / "result.json"
    spawn_ranks(WORKER, world_size, [str(out), str(tmp_path), *cases], timeout=timeout)
    return json.loads(out.read_text())


# bf16/fp16 against the fp32 reference: rounding of the parameters (one bf16 ulp at 0.05 is
# 2.4e-4) and of every activation; the "grad" estimate (difference / lr) is meaningless there.
LOW_PRECISION = {"loss": 1e-4, "eval_loss": 1e-4, "grad_norm": 5e-3, "params": 1e-3}


def check(results: dict) -> None:
    for case, r in results.items():
        print(case, {k: v for k, v in r.items() if k != "keys_on_rank0"})
        assert r["all_keys_once_per_stage_group"], case
        if "in_flight" in r:  # the planner's activation count, against torch's own schedule order
            assert r["in_flight"]["ours"] == r["in_flight"]["torch"], (case, r["in_flight"])
        low = "dtype=" in case
        for key in ("loss", "grad_norm", "grad", "params", "eval_loss"):
            tol = LOW_PRECISION.get(key) if low else TOL
            if key in r and tol is not None:
                assert r[key] < tol, f"{case}: {key} differs from single-device eager by {r[key]:.3g}"


@pytest.mark.distributed
@pytest.mark.compiled
def test_two_stages(tmp_path):
    """PP 2 under 1F1B, interleaved with 2 virtual stages, GPipe with full remat, fp16 with loss
    scaling, the stages compiled (aot_eager: each stage's forward compiled, its backward through
    AOTAutograd, run by the schedule's autograd call; the loss and the update compiled too;
    inductor lowers the same graphs), a PP 2 checkpoint resumed without stages (TP 2), and
    stages agreeing to skip an fp16 step one of them overflowed."""
    results = spawn(2, ["pipe=2,save=pp2", "tensor=2,resume=pp2", "pipe=2,virtual=2",
                        "pipe=2,schedule=GPipe,remat=full", "pipe=2,dtype=fp16",
                        "pipe=2,compiled=aot_eager", "agree"], tmp_path)
    agree = results.pop("agree")
    assert agree["skipped"] == [1, 1] and agree["kept"] == [True, True]
    assert agree["scale"] == [agree["initial_scale"] / 2] * 2
    check(results)
    assert results["pipe=2,save=pp2"]["keys_on_rank0"][0] == "embed"
    assert "lm_head" not in results["pipe=2,save=pp2"]["keys_on_rank0"]
    assert results["tensor=2,resume=pp2"]["resumed_at"] == 2


@pytest.mark.distributed
def test_four_ranks_tensor_fsdp_and_resume_under_another_pipe_size(tmp_path):
    """PP 2 x TP 2 and PP 2 x FSDP 2 (eager, and compiled: a stage with a data axis returns its
    loss as a DTensor from the compiled region); the FSDP run's checkpoint resumed under PP 4,
    then equal to the reference's third step."""
    results = spawn(4, ["pipe=2,tensor=2", "pipe=2,fsdp=2,save=ck", "pipe=2,fsdp=2,compiled=aot_eager",
                        "pipe=4,micro=4,resume=ck"], tmp_path)
    check(results)
    assert results["pipe=4,micro=4,resume=ck"]["resumed_at"] == 2
