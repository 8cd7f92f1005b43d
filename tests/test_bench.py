"""`ddpmctl bench` runs and reports sane fields (never timings)."""

from __future__ import annotations

import json

import pytest
import torch

from ddpmctl import bench
from ddpmctl import spec as S
from ddpmctl.devices import auto_precision_name
from ddpmctl.unet import build

TINY_BENCH = ["--preset", "shapes", "--device", "cpu", "--batch-size", "2", "--steps", "1", "--repeats", "1",
              "--warmup", "1", "--sample-batch-size", "2", "--sample-steps", "2"]


# ---------------------------------------------------------------------------------------------- bench


def test_bench_json_reports_sane_fields(cli):
    r = cli("bench", *TINY_BENCH, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    required = ["device", "preset", "batch_size", "train_images_per_s", "sample_ms_per_step",
                "sample_images_per_s_1000_steps", "flops_per_image_train", "peak_memory_bytes", "achieved_tflops",
                "mfu"]
    assert not [k for k in required if k not in out]
    assert out["device"] == "cpu" and out["preset"] == "shapes" and out["batch_size"] == 2
    auto = auto_precision_name(torch.device("cpu"))  # bf16 on CPUs with native bf16, else fp32
    assert out["sample_batch_size"] == 2 and out["precision"] == auto and out["compile"] is False
    assert out["train_images_per_s"] > 0 and out["sample_ms_per_step"] > 0
    # images/s of a 1000-step DDPM follows from ms per step and the batch
    assert out["sample_images_per_s_1000_steps"] == pytest.approx(2 / (out["sample_ms_per_step"] * 1e-3 * 1000))
    # backward costs about twice the forward
    assert 2.5 < out["flops_per_image_train"] / out["flops_per_image_forward"] < 3.5
    assert out["peak_memory_bytes"] > 10 * 2**20
    assert out["achieved_tflops"] == pytest.approx(out["train_images_per_s"] * out["flops_per_image_train"] / 1e12)
    assert out["matmul_peak_tflops"] > 0 and out["peak_dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[auto]
    assert out["mfu"] == pytest.approx(out["achieved_tflops"] / out["matmul_peak_tflops"])
    assert out["parameters"] == sum(p.numel() for p in build(S.resolve("shapes").model).parameters())
    assert "training shapes" in r.stderr  # progress on stderr, the result alone on stdout


def test_bench_human_output_and_only(cli):
    r = cli("bench", *TINY_BENCH, "--only", "sample")
    assert r.returncode == 0, r.stderr
    assert "ms per step" in r.stdout and "1000-step DDPM" in r.stdout
    assert "training " not in r.stdout  # --only sample skips training


@pytest.mark.parametrize("tflops, shown", [(0.0213, "21.3 GFLOP/s"), (0.000456, "0.456 GFLOP/s"),
                                           (0.5, "500 GFLOP/s"), (1.0, "1.00 TFLOP/s"), (12.34, "12.3 TFLOP/s"),
                                           (987.6, "988 TFLOP/s"), (None, "n/a")])
def test_flop_rates_keep_three_significant_digits(tflops, shown):
    from ddpmctl.cli.bench import flop_rate

    assert flop_rate(tflops) == shown


def test_a_cpu_bench_report_shows_a_rate_that_agrees_with_its_utilisation():
    """0.02 TFLOP/s against a 0.5 TFLOP/s peak is 4 %: the line must not read "0.0 TFLOP/s, 4.0%"."""
    import re

    from ddpmctl.cli.bench import report_lines

    r = {"device_name": "cpu", "torch": "2", "precision": "fp32", "compile": False, "preset": "shapes",
         "parameters": 1e6, "flops_per_image_train": 3e7, "flops_per_image_forward": 1e7,
         "train_images_per_s": 666.7, "batch_size": 16, "train_step_ms": 24.0, "achieved_tflops": 0.02,
         "mfu": 0.04, "peak_memory_bytes": None, "peak_memory_kind": "n/a", "sample_ms_per_step": None,
         "matmul_peak_tflops": 0.5, "peak_dtype": "float32"}
    lines = report_lines(r)
    train = next(x for x in lines if x.startswith("training"))
    rate = float(re.search(r"([\d.]+) GFLOP/s", train).group(1))
    util = float(re.search(r"utilisation ([\d.]+)%", train).group(1))
    peak = float(re.search(r"([\d.]+) GFLOP/s", next(x for x in lines if x.startswith("matmul"))).group(1))
    assert rate == 20.0 and peak == 500.0 and util == pytest.approx(100 * rate / peak)
    assert "0.0300 GFLOP train" in lines[2]  # 3e7 FLOPs: not "0.0 GFLOP"


@pytest.mark.parametrize("args, message", [(["--preset", "nope"], "unknown preset 'nope'"),
                                           (["--only", "both"], "--only expects 'train' or 'sample'")])
def test_bench_usage_errors_exit_2(cli, args, message):
    r = cli("bench", *args)
    assert r.returncode == 2
    assert message in r.stderr


def test_flops_per_image_match_the_ho_et_al_network():
    f = bench.model_flops_per_image(S.resolve("cifar10"))
    assert f["train"] == pytest.approx(37.3e9, rel=0.01)
    assert f["forward"] == pytest.approx(12.44e9, rel=0.01)


def test_bench_restores_global_flags():
    before = torch.are_deterministic_algorithms_enabled()
    bench.run("shapes", device="cpu", batch_size=2, steps=1, warmup=0, repeats=1, sample=False, peak=False)
    assert torch.are_deterministic_algorithms_enabled() == before


def test_guided_sampling_bench_runs_both_branches_in_one_forward():
    """`bench --guidance W`: a 10-class version of the preset whose every timed network call carries the
    conditional and the unconditional rows of each image (twice the sampling batch)."""
    from ddpmctl.unet import UNet

    seen: list[int] = []

    def hook(module, args, _out):
        if isinstance(module, UNet):
            seen.append(args[0].shape[0])

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        r = bench.run("shapes", device="cpu", train=False, peak=False, sample_batch_size=3, sample_steps=2,
                      repeats=1, guidance=2.0)
    finally:
        handle.remove()
    assert r["sample_guidance"] == 2.0 and r["sample_ms_per_step"] > 0
    assert 6 in seen and 3 not in seen  # (the FLOP count's own forward passes use a batch of 2)
