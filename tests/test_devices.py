"""Precision choice (ddpmctl.devices): auto is bf16 on the CPU exactly when it has native bf16
arithmetic, and an ISA cap below AVX-512 makes it fp32."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ddpmctl.devices import auto_precision_name, choose_precision, cpu_has_native_bf16

pytestmark = pytest.mark.numerics  # run again with the AVX2 cap in .ci/run (issue 18)


def _cpu_flags() -> set[str] | None:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def test_auto_precision_on_cpu_is_bf16_exactly_when_the_cpu_has_native_bf16():
    flags = _cpu_flags()
    if flags is None or "avx2" not in flags:
        pytest.skip("needs an x86 Linux CPU (/proc/cpuinfo flags)")
    # ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA below AVX-512 (the restricted-ISA pass of .ci/run)
    # make this CPU act as one without bf16 arithmetic
    capped = os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2") or \
        os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE")
    native = ("avx512_bf16" in flags or "amx_tile" in flags) and torch.backends.mkldnn.is_available() and not capped
    assert cpu_has_native_bf16() is native
    cpu = torch.device("cpu")
    assert auto_precision_name(cpu) == ("bf16" if native else "fp32")
    assert choose_precision("auto", cpu).autocast_dtype == (torch.bfloat16 if native else None)
    assert choose_precision("fp32", cpu).autocast_dtype is None  # the way back to full precision


@pytest.mark.parametrize("cap", [{"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"ATEN_CPU_CAPABILITY": "avx2"}])
def test_an_isa_cap_below_avx512_makes_auto_precision_fp32(cap):
    """Told to use AVX2 (as an older CPU would), auto must not pick bf16 that would then be emulated."""
    code = "import torch; from ddpmctl.devices import auto_precision_name as a; print(a(torch.device('cpu')))"
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    r = subprocess.run([sys.executable, "-c", code], env={**env, **cap}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "fp32"
