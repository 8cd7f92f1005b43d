"""The one device and precision chooser, and the process-wide backend flags.

The CLI resolves the device once per command (``cli.common.command_device``) and hands the library a
``torch.device``; a library function given a name or None instead resolves it with :func:`resolve`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from ddpmctl.errors import DeviceError


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def choose_device(name: str = "auto") -> torch.device:
    """auto: CUDA, then Apple MPS, then CPU. An unavailable explicit device is a DeviceError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not mps_available():
            raise DeviceError("--device mps: Apple MPS is not available on this machine; use --device cpu or auto")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {name}: CUDA is not available (no NVIDIA GPU, or a CPU-only PyTorch build); "
                "use --device cpu or auto"
            )
        idx = int(name.split(":")[1]) if ":" in name else torch.cuda.current_device()
        if idx >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) (cuda:0..)")
        return torch.device("cuda", idx)
    raise DeviceError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps")


def resolve(device: str | torch.device | None) -> torch.device:
    """The device a library call runs on: a ``torch.device`` (as the CLI hands one) as it is, a name
    through :func:`choose_device`, None as ``auto``."""
    if isinstance(device, torch.device):
        return device
    return choose_device(device or "auto")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "mps":
        return "mps (Apple Silicon GPU)"
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'s' if n != 1 else ''})"


def device_info(device: torch.device) -> dict:
    """The device as JSON: {"type": "cpu", "threads": 2}, {"type": "cuda", "index": 0, "name": ...},
    {"type": "mps"}."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {"type": "cuda", "index": index, "name": torch.cuda.get_device_name(index)}
    if device.type == "cpu":
        return {"type": "cpu", "threads": torch.get_num_threads()}
    return {"type": device.type}


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    autocast_dtype: torch.dtype | None
    needs_scaler: bool

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


# ONEDNN_MAX_CPU_ISA values whose instruction set multiplies bf16 in hardware (oneDNN's names:
# AVX512_CORE_BF16, AVX512_CORE_FP16, AVX512_CORE_AMX*, AVX10_1_512*; ALL/DEFAULT: no cap).
_BF16_ISA_MARKS = ("BF16", "FP16", "AMX", "AVX10", "ALL", "DEFAULT")


def cpu_isa_allows_bf16() -> bool:
    """False when PyTorch or oneDNN was told to use an instruction set without bf16 arithmetic
    (``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``: how one runs as an older CPU
    would, e.g. the test suite's second pass in .ci/run); bf16 would then be emulated."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if isa and not any(mark in isa for mark in _BF16_ISA_MARKS):
        return False
    try:
        return "AVX512" in torch.backends.cpu.get_cpu_capability().upper()
    except Exception:  # noqa: BLE001 - older builds lack the probe: trust the CPU flags
        return True


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX), torch was built
    with oneDNN and no ISA cap (:func:`cpu_isa_allows_bf16`) forbids it: its bf16 convolutions then
    run ~1.7-1.9x faster than fp32 (docs/performance.md); elsewhere bf16 would be emulated and slower
    than fp32."""
    try:
        if not torch.backends.mkldnn.is_available():  # a build without oneDNN has no fast bf16 kernels
            return False
        if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
            return False
    except Exception:  # noqa: BLE001 - private probes; missing in some builds: assume emulated
        return False
    return cpu_isa_allows_bf16()


def auto_precision_name(device: torch.device) -> str:
    """What ``--precision auto`` means on ``device``: bf16 autocast where the device computes bf16
    natively (CUDA GPUs that support it, CPUs with AVX512-BF16 or AMX), fp32 elsewhere (MPS
    included)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def choose_precision(name: str, device: torch.device) -> Precision:
    """auto: bf16 autocast where the device computes bf16 natively (:func:`auto_precision_name`),
    fp32 elsewhere."""
    if name == "auto":
        name = auto_precision_name(device)
    if name == "fp32":
        return Precision("fp32", None, False)
    if name == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError(f"--precision bf16: {describe(device)} does not support bfloat16; use fp16 or fp32")
        return Precision("bf16", torch.bfloat16, False)
    if name == "fp16":
        if device.type == "cpu":
            raise DeviceError("--precision fp16 needs a GPU (cuda or mps); on CPU use fp32 or bf16")
        return Precision("fp16", torch.float16, True)
    raise DeviceError(f"--precision {name!r}: expected auto, fp32, bf16 or fp16")


def set_fast_math(device: torch.device, deterministic: bool) -> None:
    """The process-wide backend flags: on CUDA TF32 for fp32 matmuls/convs and cuDNN autotuning unless
    deterministic, else deterministic algorithms. Set once per process: by the CLI's
    ``command_device`` for each command, by training's setup for a run (from ``train.deterministic``);
    sampling (``generate``) leaves them as they are."""
    if deterministic and device.type == "cuda":  # cuBLAS needs this before its first use to be deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic
        torch.backends.cudnn.benchmark = not deterministic
    # CPU kernels are deterministic already; the switch matters on GPUs (and importing it costs
    # 1-3 s of dynamo start-up, so it is skipped where it changes nothing).
    if deterministic and device.type != "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
