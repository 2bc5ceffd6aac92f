"""The planner (parallel/plan.py, runners/plan.py).

Reference for the activation figures: the tensors autograd itself saves for the backward of
`models.llama` (saved-tensor hooks, on the meta device: no memory), per layer and for the head.
Parameter, optimizer and KV-cache figures are checked against the shards `parallel.sharded`
builds on a fake 64-rank process group (tests/test_plan_64.py) and by hand below.
"""
import dataclasses

import pytest
import torch

from lib import optim, pytree
from lib.errors import UserError
from models import attention, llama
from parallel import plan, sharding, train_step
from parallel.mesh import Mesh
from parallel.pipeline import PipelineConfig
from runners import plan as plan_runner

RULES = sharding.load_rules()
ONE = {"data": 1, "fsdp": 1, "tensor": 1}


def saved_by_autograd(config: llama.Config, rows: int, seq: int, dtype: torch.dtype, remat: str) -> int:
    """Bytes autograd keeps for the backward of the loss (parameters excluded), traced on meta."""
    params = pytree.tree_map(lambda t: t.requires_grad_(), llama.init(config, dtype=dtype, device="meta"))
    param_storages = {t.untyped_storage()._cdata for t in pytree.leaves(params)}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in param_storages:
            saved[storage._cdata] = storage.nbytes()
        return t

    hook, kernels = train_step.apply_remat(remat, llama.Kernels(attention=attention.reference))
    tokens, labels = (torch.zeros(rows, seq, dtype=torch.long, device="meta") for _ in range(2))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        llama.cross_entropy(llama.forward(params, tokens, config, kernels=kernels, remat=hook), labels)
    return sum(saved.values())


@pytest.mark.parametrize("remat", ["none", "selective", "full"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("shape", [dict(vocab_size=1000, dim=256, n_heads=8, n_kv_heads=2, ffn_dim=704),
                                   dict(vocab_size=3000, dim=128, n_heads=4, ffn_dim=320)],
                         ids=["gqa", "mha"])
def test_activation_formula_equals_what_autograd_saves(shape, dtype, remat):
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    one, two = (llama.Config(n_layers=n, **shape) for n in (1, 2))
    rows, seq = 3, 96
    per_layer = saved_by_autograd(two, rows, seq, torch_dtype, remat) - saved_by_autograd(one, rows, seq, torch_dtype, remat)
    head = saved_by_autograd(one, rows, seq, torch_dtype, remat) - per_layer
    x = plan._dims(one, RULES, Mesh(None, ONE), rows, seq, dtype)
    assert plan.layer_saved(x, remat, "reference", compiled=False) == per_layer
    assert 0 <= head - plan.head_saved(x, global_rows=rows, compiled=False) <= 16  # 0-dim scalars left out


def test_state_terms_count_each_devices_shards():
    model = llama.PRESETS["llama2-70b"]
    p = plan.plan(model, {"data": 1, "fsdp": 8, "tensor": 8}, RULES,
                  plan.Workload(global_batch=64, seq_len=4096, micro_batches=8, dtype="bf16", remat="full"))
    terms = {t.name: t.bytes for t in p.persistent}
    # Norm scales are replicated; every other weight is split 64 ways.
    norms = (2 * model.n_layers + 1) * model.dim
    elements = (llama.num_params(model) - norms) // 64 + norms
    assert terms == {"parameters": 2 * elements, "master weights": 4 * elements,
                     "optimizer state": 8 * elements}
    assert p.micro_batch_rows == 1
    assert p.total == sum(terms.values()) + max(sum(t.bytes for t in p.forward_backward),
                                                sum(t.bytes for t in p.update))


def test_kv_cache_is_split_like_the_rules_say():
    model = llama.PRESETS["llama3-70b"]
    sizes = {"data": 2, "fsdp": 4, "tensor": 8}
    got = plan.kv_cache_bytes(model, RULES, Mesh(None, sizes), batch=16, length=8192, dtype="bf16")
    # kv_heads 8 over tensor 8, batch 16 over data x fsdp = 8: 2 rows per device
    k_and_v = 2 * model.n_layers * 2 * 8192 * 1 * model.head_dim * 2
    assert got == k_and_v + 2 * 8 + 8  # + its rows' start offsets and the write index (int64)
    with pytest.raises(UserError, match=r"KV cache.*dim 0 \('batch'\) of size 4 is not divisible by mesh axes "
                                        r"\['data', 'fsdp'\] \(total 8\)"):
        plan.kv_cache_bytes(model, RULES, Mesh(None, sizes), batch=4, length=128, dtype="bf16")


def test_more_recompute_and_smaller_micro_batches_need_less():
    model = llama.PRESETS["llama2-7b"]
    sizes = {"data": 1, "fsdp": 8, "tensor": 1}
    totals = {}
    for remat in ("none", "selective", "full"):
        for mb in (4, 16):
            w = plan.Workload(global_batch=128, seq_len=4096, micro_batches=mb, dtype="bf16", remat=remat)
            totals[remat, mb] = plan.plan(model, sizes, RULES, w).total
    assert totals["none", 4] > totals["selective", 4] > totals["full", 4]
    assert totals["none", 4] > totals["none", 16]


def test_bad_mesh_and_batch_are_named_before_anything_else():
    model = llama.PRESETS["llama2-7b"]
    w = plan.Workload(global_batch=64, seq_len=4096)
    with pytest.raises(UserError, match=r"embed: dim 0 \('vocab'\) of size 32000 is not divisible "
                                        r"by mesh axes \['tensor'\] \(total 3\)"):
        plan.plan(model, {"data": 1, "fsdp": 1, "tensor": 3}, RULES, w)
    with pytest.raises(UserError, match=r"global_batch=60 is not divisible by the data-parallel ranks \(8\) x "
                                        r"train.step.micro_batches \(1\)"):
        plan.plan(model, {"data": 1, "fsdp": 8, "tensor": 1}, RULES, dataclasses.replace(w, global_batch=60))


def run_plan(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        plan_runner.cli.run(plan_runner.main, argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_runner_says_it_fits_with_free_memory_and_throughput(capsys):
    code, out, _ = run_plan(["model=llama2-70b", "mesh.fsdp=8", "mesh.tensor=8", "train.global_batch=1024",
                             "data.seq_len=4096", "train.step.micro_batches=128", "train.step.remat=full",
                             "train.step.dtype=bf16", "device=910b-64g",
                             "generate.batch_size=8", "generate.max_len=4096"], capsys)
    assert code == 0, out
    assert "verdict: fits with" in out and "GiB free" in out
    assert "tokens/s per device" in out and "354 TFLOP/s bf16" in out
    assert "KV cache 0.16" in out


def test_runner_says_how_much_more_and_what_to_try(capsys):
    code, out, _ = run_plan(["model=llama2-7b", "mesh.fsdp=8", "train.global_batch=64", "data.seq_len=4096",
                             "train.step.micro_batches=8", "train.step.remat=none", "train.step.dtype=bf16",
                             "device=a100-40g"], capsys)
    assert code == 1
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("verdict: needs ") and "GiB more: try train.step.remat=full" in verdict, verdict


def test_runner_refuses_unknown_devices_and_meshes_that_do_not_match(capsys):
    code, _, err = run_plan(["model=llama2-7b", "device=tpu-v9"], capsys)
    assert code == 2 and "device='tpu-v9' is not a known device" in err
    code, _, err = run_plan(["model=llama2-7b", "device=h100-80g"], capsys)
    assert code == 2 and "mesh.fsdp=-1 fills the world size: give world_size=" in err
    code, _, err = run_plan(["model=llama2-7b", "device=h100-80g", "mesh.fsdp=4", "mesh.tensor=2",
                             "world_size=16"], capsys)
    assert code == 2 and "product 8 != world size 16" in err
    code, _, err = run_plan(["model=llama2-7b", "device_memory=80", "mesh.fsdp=8", "train.stpes=3"], capsys)
    assert code == 2 and "did you mean 'steps'" in err


def test_planner_reads_the_pretrain_config_files(capsys):
    code, out, _ = run_plan(["configs/llama2-7b.yaml", "world_size=8", "device=910b-64g"], capsys)
    assert code in (0, 1) and "remat=full" in out and "16 micro-batch(es)" in out


def test_pipeline_stages_split_the_layers_and_hold_their_micro_batches_in_flight():
    model = llama.PRESETS["llama2-7b"]
    w = plan.Workload(global_batch=64, seq_len=2048, micro_batches=8, dtype="bf16", remat="full")
    flat = plan.plan(model, {"pipe": 1, "data": 1, "fsdp": 8, "tensor": 1}, RULES, w)
    staged = plan.plan(model, {"pipe": 4, "data": 1, "fsdp": 2, "tensor": 1}, RULES, w)
    assert staged.pipeline_bubble == pytest.approx(3 / (8 + 3))
    assert staged.total == max(staged.stage_totals) and flat.pipeline_bubble == 0.0
    # 1F1B: rank r holds 4 - r micro-batches in flight; the last also runs the head. (Where the
    # optimizer update is a rank's peak, ranks of equal layer counts total the same.)
    first, second, third, last = staged.stage_totals
    assert first > second >= third and last > third
    # The largest here is the last rank: 1 micro-batch of its 8 layers' inputs (4 rows x 2048 x
    # 4096 bf16 per micro-batch and device) and the logits.
    activations = {t.name: t.bytes for t in staged.forward_backward}["activations"]
    assert activations == 1 * 8 * (4 * 2048 * 4096 * 2)
    with pytest.raises(UserError, match="not divisible by mesh.pipe=3"):
        plan.plan(model, {"pipe": 3, "data": 1, "fsdp": 1, "tensor": 1}, RULES, w)
    # Interleaved over 2 virtual stages: the bubble halves; rank 0 holds torch's warm-up of
    # (2 - 1) x 4 + 2 x 3 = 10 forward chunks plus one, each 4 of its 8 layers deep (32 rows
    # per micro-batch and device, so that activations rather than the update decide the peak).
    inter = dataclasses.replace(w, global_batch=512,
                                pipeline=PipelineConfig(schedule="Interleaved1F1B", virtual_stages=2))
    staged = plan.plan(model, {"pipe": 4, "data": 1, "fsdp": 2, "tensor": 1}, RULES, inter)
    assert staged.pipeline_bubble == pytest.approx(3 / (8 + 3) / 2)
    assert staged.total == max(staged.stage_totals) == staged.stage_totals[0]
    activations = {t.name: t.bytes for t in staged.forward_backward}["activations"]
    assert activations == 11 * 4 * (32 * 2048 * 4096 * 2)
