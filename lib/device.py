"""Which accelerator we run on (Ascend NPU, CUDA or CPU), and what it can do.

    dev = device.detect("auto")          # Device(kind="cuda", torch_device=cuda:0, backend="nccl", ...)
    dist = device.init_distributed(dev)  # from torchrun's env vars; single process without them
    device.peak_flops(dev, torch.bfloat16)  # dense peak FLOP/s, or None when unknown

torch_npu is imported lazily: it is optional, and without Ascend CANN it fails at import time.
Peak FLOP/s come from vendor datasheets (dense, no sparsity) for accelerators; the CPU ceiling is
measured once per machine with a timed GEMM and cached. An unknown device has no peak (None):
MFU is then reported as unknown, never computed from a guessed number.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lib import dtypes
from lib.errors import UserError

KINDS = ("auto", "npu", "cuda", "cpu")
_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
CACHE_DIR_NAME = "llamax"


@dataclass(frozen=True)
class Device:
    kind: str                   # "npu" | "cuda" | "cpu"
    torch_device: torch.device  # where tensors go: npu:LOCAL_RANK, cuda:LOCAL_RANK or cpu
    backend: str                # process-group backend: "hccl" | "nccl" | "gloo"
    name: str                   # "Ascend910B2", "NVIDIA H100 80GB HBM3", the CPU model


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------------------------
# Detection

_CANN_HELP = (
    "Ascend CANN is missing or not sourced, so torch_npu cannot load ({error}). "
    "Install CANN and torch_npu (`pip install .[npu]`), then run "
    "`source /usr/local/Ascend/ascend-toolkit/set_env.sh` in this shell. "
    "To use CUDA or CPU on this machine instead, pass device=cuda or device=cpu; "
    "TORCH_DEVICE_BACKEND_AUTOLOAD=0 keeps `import torch` working while torch_npu is installed "
    "without CANN."
)


def import_torch_npu():
    """torch_npu, or a UserError that says how to get a working one."""
    try:
        return importlib.import_module("torch_npu")
    except ModuleNotFoundError as e:
        if e.name != "torch_npu":
            raise UserError(_CANN_HELP.format(error=e)) from e
        raise UserError("device=npu needs torch_npu, which is not installed: "
                        "`pip install .[npu]` on a machine with Ascend CANN") from e
    except (ImportError, OSError) as e:  # libhccl.so / libascendcl.so not found
        raise UserError(_CANN_HELP.format(error=e)) from e


def _torch_npu_installed() -> bool:
    if "torch_npu" in sys.modules:
        return sys.modules["torch_npu"] is not None
    try:
        return importlib.util.find_spec("torch_npu") is not None
    except ImportError:  # present but broken: importing it will say why
        return True


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _torch_device(kind: str, index: int) -> torch.device:
    # "npu" is a valid device type only once torch_npu has registered it.
    return torch.device(kind, index)


def detect(name: str = "auto") -> Device:
    """The device to run on: `name` is auto | npu | cuda | cpu.

    auto prefers an Ascend NPU (when torch_npu is installed), then CUDA, then CPU. Asking for an
    accelerator that is absent is an error, never a quiet fall back to CPU.
    """
    if name not in KINDS:
        raise UserError(f"device={name!r} is not one of {', '.join(KINDS)}")
    index = _local_rank()
    if name == "npu" or (name == "auto" and _torch_npu_installed()):
        import_torch_npu()
        if not torch.npu.is_available():
            if name == "npu":
                raise UserError("device=npu: torch_npu loaded but sees no NPU "
                                "(check `npu-smi info` and ASCEND_RT_VISIBLE_DEVICES)")
        else:
            return Device("npu", _torch_device("npu", index), _BACKENDS["npu"],
                          torch.npu.get_device_name(index))
    if name in ("cuda", "auto"):
        if torch.cuda.is_available():
            return Device("cuda", _torch_device("cuda", index), _BACKENDS["cuda"],
                          torch.cuda.get_device_name(index))
        if name == "cuda":
            raise UserError("device=cuda but torch sees no CUDA GPU "
                            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    return Device("cpu", torch.device("cpu"), _BACKENDS["cpu"], cpu_model())


def _accelerator_module(dev: Device):
    return {"npu": getattr(torch, "npu", None), "cuda": torch.cuda}.get(dev.kind)


def synchronize(dev: Device) -> None:
    """Wait for queued device work, so a wall-clock time measures it."""
    module = _accelerator_module(dev)
    if module is not None:
        module.synchronize(dev.torch_device)


def memory_stats(dev: Device) -> dict[str, int]:
    """Memory in bytes. Accelerators: allocated / peak (max allocated) / reserved by the caching
    allocator. CPU: allocated = resident set size now, peak = maximum resident set size."""
    module = _accelerator_module(dev)
    if module is not None:
        d = dev.torch_device
        return {"allocated": module.memory_allocated(d), "peak": module.max_memory_allocated(d),
                "reserved": module.memory_reserved(d)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    try:
        rss_pages = int(Path("/proc/self/statm").read_text().split()[1])
        rss = rss_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = peak
    # The kernel updates ru_maxrss lazily: it can trail the resident set read a moment later.
    return {"allocated": rss, "peak": max(peak, rss)}


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s

# Dense (no 2:4 sparsity) peak TFLOP/s per dtype. "tf32" is what fp32 matmuls run at when torch
# allows TF32. Matched as substrings of the device name, most specific first.
# Sources: NVIDIA datasheets (A100: nvidia-a100-datasheet; H100 SXM/PCIe/NVL: H100 Tensor Core GPU
# datasheet; H200/H200 NVL: H200 datasheet), whose tensor-core figures are quoted "with sparsity":
# the dense peak is half. Ascend 910B: Huawei publishes no per-variant table we could cite;
# 354 TFLOP/s fp16/bf16 for the 910B family is the figure volcengine/verl uses
# (verl/utils/flops_counter.py), and 376 TFLOP/s for the 910B2 is the figure commonly quoted for
# that variant (Atlas 800T A2). fp32 on the 910B has no published dense figure: unknown.
_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}),  # SXM5
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}),  # SXM
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),  # SXM4 and PCIe
    ("Ascend910B2", {"bf16": 376.0, "fp16": 376.0}),
    ("Ascend910B", {"bf16": 354.0, "fp16": 354.0}),
)

def _tf32_enabled() -> bool:
    return torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"


def table_peak_flops(device_name: str, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """Datasheet dense peak FLOP/s of a named accelerator, None when not in the table."""
    key = dtypes.short_name(dtype) if dtype in dtypes.DTYPES.values() else None
    if key == "fp32" and tf32:
        key = "tf32"
    for pattern, peaks in _PEAK_TFLOPS:
        if pattern in device_name:
            tflops = peaks.get(key)
            return None if tflops is None else tflops * 1e12
    return None


def peak_flops(dev: Device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of one device for matmuls in `dtype`; None when unknown.

    Accelerators: the datasheet table above. CPU: a measured GEMM rate, cached per machine.
    """
    if dev.kind == "cpu":
        return measured_cpu_flops(dtype)
    return table_peak_flops(dev.name, dtype, tf32=dev.kind == "cuda" and _tf32_enabled())


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / CACHE_DIR_NAME


def _gemm_size(dtype: torch.dtype, target_seconds: float = 0.05, largest: int = 2048) -> int:
    """The largest power-of-two size (256..largest) whose matmul takes about target_seconds:
    big enough to reach the GEMM rate, small enough that a slow dtype (bf16 without AVX512-BF16
    runs ~40x slower than fp32) is measured in about a second."""
    n = 256
    while n < largest:
        a = torch.randn(n, n).to(dtype)
        a @ a  # the first call of a size pays for packing buffers
        start = time.perf_counter()
        a @ a
        if time.perf_counter() - start > target_seconds:
            break
        n *= 2
    return n


def _time_gemm(dtype: torch.dtype, n: int | None = None, rounds: int = 3,
               min_seconds: float = 0.1) -> float:
    """Best-of-rounds FLOP/s of an n×n×n matmul on this CPU (the rate a well-shaped matmul gets)."""
    n = n or _gemm_size(dtype)
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # warm-up: thread pool, packing buffers
    best = 0.0
    for _ in range(rounds):
        count, start = 0, time.perf_counter()
        while True:
            a @ b
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = max(best, 2 * n**3 * count / elapsed)
    return best


def measured_cpu_flops(dtype: torch.dtype) -> float:
    """This CPU's GEMM FLOP/s for `dtype`, measured on first use and cached in
    ~/.cache/llamax/cpu_peak_flops.json under (CPU model, threads, torch version, dtype).
    Measure on an idle machine: a busy one caches a low ceiling (delete the file to re-measure)."""
    path = cache_dir() / "cpu_peak_flops.json"
    key = (f"{cpu_model()} | threads={torch.get_num_threads()} | torch={torch.__version__} | "
           f"{str(dtype).removeprefix('torch.')}")
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if key in table:
        return float(table[key])
    table[key] = _time_gemm(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return table[key]


# ---------------------------------------------------------------------------------------------
# Processes


def init_distributed(dev: Device) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
    with the backend of `dev`, after pinning this process to its local device.

    Without those variables (or WORLD_SIZE=1) this is one process and no group is created.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), _local_rank()
    if world_size == 1:
        return DistInfo(0, 1, 0)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: "
                        "launch with torchrun, which sets them")
    if dev.kind == "npu":
        torch.npu.set_device(local_rank)
    elif dev.kind == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=dev.backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank)


def set_inductor_cache_per_rank(base_dir: str | os.PathLike) -> Path:
    """Point TORCHINDUCTOR_CACHE_DIR at base_dir/rank<RANK>; call before the first compile.

    One cache shared by several ranks gave wrong results on a warm rerun (DESIGN.md).
    """
    path = Path(base_dir) / f"rank{int(os.environ.get('RANK', '0'))}"
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path
