"""lib/device.py: detection, the missing-CANN message, peak FLOP/s, processes and caches."""
from __future__ import annotations

import importlib.abc
import json
import sys
import types

import pytest
import torch

from lib import device
from lib.errors import UserError


def test_detect_cpu():
    dev = device.detect("cpu")
    assert (dev.kind, dev.torch_device, dev.backend) == ("cpu", torch.device("cpu"), "gloo")
    assert dev.name == device.cpu_model()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_auto_without_accelerators_is_cpu_and_cuda_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # not installed
    assert device.detect("auto").kind == "cpu"
    with pytest.raises(UserError, match="device=cuda but torch sees no CUDA GPU"):
        device.detect("cuda")


def test_unknown_device_name():
    with pytest.raises(UserError, match="'tpu' is not one of auto, npu, cuda, cpu"):
        device.detect("tpu")


def test_npu_without_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    with pytest.raises(UserError, match=r"needs torch_npu, which is not installed.*pip install \.\[npu\]"):
        device.detect("npu")


class _BrokenTorchNpu(importlib.abc.MetaPathFinder):
    """What importing torch_npu does when Ascend CANN is absent."""

    def find_spec(self, name, path, target=None):
        if name == "torch_npu":
            raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")
        return None


@pytest.mark.parametrize("name", ["npu", "auto"])
def test_npu_without_cann_explains_the_fix(monkeypatch, name):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenTorchNpu(), *sys.meta_path])
    with pytest.raises(UserError) as err:
        device.detect(name)
    message = str(err.value)
    for part in ("Ascend CANN is missing", "libhccl.so", "pip install .[npu]",
                 "source /usr/local/Ascend/ascend-toolkit/set_env.sh",
                 "TORCH_DEVICE_BACKEND_AUTOLOAD=0"):
        assert part in message


@pytest.fixture
def fake_npu(monkeypatch):
    """torch_npu importable and torch.npu answering like one Ascend 910B2."""
    calls = []
    npu = types.SimpleNamespace(
        is_available=lambda: True,
        get_device_name=lambda index: "Ascend910B2",
        synchronize=lambda d: calls.append(("synchronize", d)),
        memory_allocated=lambda d: 1, max_memory_allocated=lambda d: 3, memory_reserved=lambda d: 4,
    )
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    monkeypatch.setattr(device, "_torch_device", lambda kind, index: (kind, index))
    return calls


def test_detect_npu(fake_npu, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    for name in ("npu", "auto"):
        dev = device.detect(name)
        assert (dev.kind, dev.torch_device, dev.backend, dev.name) == ("npu", ("npu", 3), "hccl",
                                                                       "Ascend910B2")
    device.synchronize(dev)
    assert fake_npu == [("synchronize", ("npu", 3))]
    assert device.memory_stats(dev) == {"allocated": 1, "peak": 3, "reserved": 4}
    assert device.peak_flops(dev, torch.bfloat16) == 376e12


def test_cpu_memory_stats_track_resident_memory():
    before = device.memory_stats(device.detect("cpu"))
    block = torch.ones(16 * 2**20)  # 64 MiB, touched
    after = device.memory_stats(device.detect("cpu"))
    assert after["allocated"] - before["allocated"] > 60 * 2**20
    assert after["peak"] >= after["allocated"]
    del block


@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.0),   # SXM
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
    ("NVIDIA H200", torch.bfloat16, 989.0),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
    ("NVIDIA A100 80GB PCIe", torch.float16, 312.0),
    ("NVIDIA A100-SXM4-40GB", torch.float32, 19.5),
    ("Ascend910B2", torch.bfloat16, 376.0),
    ("Ascend910B3", torch.float16, 354.0),
])
def test_peak_flops_table(name, dtype, tflops):
    assert device.table_peak_flops(name, dtype) == tflops * 1e12


def test_peak_flops_unknown_is_none():
    assert device.table_peak_flops("NVIDIA A100-SXM4-80GB", torch.float32, tf32=True) == 156e12
    assert device.table_peak_flops("NVIDIA GeForce RTX 4090", torch.bfloat16) is None
    assert device.table_peak_flops("Ascend910B2", torch.float32) is None
    assert device.table_peak_flops("NVIDIA H100 80GB HBM3", torch.int8) is None
    unknown = device.Device("cuda", torch.device("cpu"), "nccl", "Some Future GPU")
    assert device.peak_flops(unknown, torch.bfloat16) is None


def test_cpu_ceiling_is_measured_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = []

    def fake_gemm(dtype):
        measured.append(dtype)
        return 1.5e11

    monkeypatch.setattr(device, "_time_gemm", fake_gemm)
    cpu = device.detect("cpu")
    assert device.peak_flops(cpu, torch.float32) == 1.5e11
    assert device.peak_flops(cpu, torch.float32) == 1.5e11
    assert device.peak_flops(cpu, torch.bfloat16) == 1.5e11
    assert measured == [torch.float32, torch.bfloat16]
    table = json.loads((tmp_path / "llamax" / "cpu_peak_flops.json").read_text())
    key = (f"{device.cpu_model()} | threads={torch.get_num_threads()} | "
           f"torch={torch.__version__} | float32")
    assert table[key] == 1.5e11 and len(table) == 2


def test_gemm_timer_counts_matmul_flops(monkeypatch):
    # A clock advancing 1 s per call: 2 calls per round around one 64^3 matmul -> 2*64^3 FLOP/s.
    ticks = iter(range(100))
    monkeypatch.setattr(device.time, "perf_counter", lambda: float(next(ticks)))
    assert device._time_gemm(torch.float32, n=64, rounds=2, min_seconds=0.5) == 2 * 64**3


def test_init_distributed_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    info = device.init_distributed(device.detect("cpu"))
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert not torch.distributed.is_initialized()


def test_init_distributed_names_missing_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(UserError, match="MASTER_ADDR, MASTER_PORT not set"):
        device.init_distributed(device.detect("cpu"))


def test_inductor_cache_per_rank(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unchanged")  # restored after the test
    monkeypatch.setenv("RANK", "3")
    path = device.set_inductor_cache_per_rank(tmp_path / "inductor")
    assert path == tmp_path / "inductor" / "rank3" and path.is_dir()
    assert device.os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
