"""ddpmctl.evaluate and `ddpmctl eval`: Fréchet distance and KID against closed forms and direct sums,
bits/dim bookkeeping, the reference-statistics cache, the Inception feature pipeline (with a locally
built, randomly initialised copy of torch-fidelity's network: no weights can be downloaded in tests),
and the CLI on a tiny trained shapes run."""

from __future__ import annotations

import json
import os
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpmctl import evaluate as ev
from ddpmctl import rundir
from ddpmctl.diffusion import Schedule
from ddpmctl.errors import UsageError

pytestmark = pytest.mark.numerics  # run again with the AVX2 cap in .ci/run (issue 18)

TINY = ["--set", "model.base_channels=16", "--set", "model.groups=8", "--set", "model.head_channels=16",
        "--set", "model.time_embed_dim=32", "--set", "sample.grid_size=4", "--set", "sample.steps=3"]
NEEDS_EXTRA = "needs the optional 'eval' extra (pip install '.[eval]'): torch-fidelity's Inception-v3"


def _random_psd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(48), _random_psd(48, rng)
    assert abs(ev.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_frechet_diagonal_gaussians_closed_form():
    """N(m1, diag a) vs N(m2, diag b): |m1 - m2|^2 + sum (sqrt a - sqrt b)^2."""
    rng = np.random.default_rng(1)
    m1, m2 = rng.standard_normal(16), rng.standard_normal(16)
    a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    want = float(((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert ev.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_frechet_full_covariances_match_eigenvalues_of_product():
    """Non-commuting covariances: Tr sqrt(S1 S2) = sum of sqrt of the eigenvalues of S1 S2 (TTUR's formula)."""
    rng = np.random.default_rng(2)
    s1, s2 = _random_psd(32, rng), _random_psd(32, rng)
    m1, m2 = rng.standard_normal(32), rng.standard_normal(32)
    tr_covmean = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    want = float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    got = ev.frechet_distance(m1, s1, m2, s2)
    assert got == pytest.approx(want, rel=1e-9)
    assert got == pytest.approx(ev.frechet_distance(m2, s2, m1, s1), rel=1e-9)  # symmetric
    low_rank = rng.standard_normal((32, 5))
    singular = low_rank @ low_rank.T  # rank 5: no Cholesky, the symmetric square root instead
    tr_covmean = np.sqrt(np.linalg.eigvals(singular @ s2).astype(complex)).real.sum()
    assert ev.trace_sqrt_product(singular, s2) == pytest.approx(tr_covmean, rel=1e-8)


def test_frechet_from_few_features_matches_full_covariance():
    """N <= D: the N x N shortcut gives the D x D answer."""
    rng = np.random.default_rng(7)
    mu2, s2 = rng.standard_normal(24), _random_psd(24, rng)
    for n in (2, 10, 24, 40):
        f = rng.standard_normal((n, 24)).astype(np.float32) + 0.3
        mu1, s1 = ev.feature_stats(f)
        want = ev.frechet_distance(mu1, s1, mu2, s2)
        assert ev.frechet_distance_from_features(f, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_feature_stats_match_numpy_in_chunks():
    f = np.random.default_rng(3).standard_normal((101, 7)).astype(np.float32)
    mu, sigma = ev.feature_stats(f, chunk=16)
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- KID


def test_mmd2_unbiased_matches_direct_sums():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((6, 3)) + 0.5

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    yy = sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / (6 * 5)
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(6)) / (5 * 6)
    got = ev.mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y))
    assert got == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_zero_in_expectation_for_one_distribution():
    """Unbiased: the mean over independent draws from one distribution is 0 within its standard error,
    where the biased (V-statistic) estimate would sit clearly above 0; a shifted distribution is far above."""
    rng = np.random.default_rng(5)
    same, biased = [], []
    for _ in range(200):
        x, y = rng.standard_normal((40, 8)), rng.standard_normal((40, 8))
        same.append(ev.mmd2_unbiased(x, y))
        kxx, kyy, kxy = ev.polynomial_kernel(x, x), ev.polynomial_kernel(y, y), ev.polynomial_kernel(x, y)
        biased.append(float(kxx.mean() + kyy.mean() - 2 * kxy.mean()))
    se = np.std(same) / math.sqrt(len(same))
    assert abs(np.mean(same)) < 3 * se
    assert np.mean(biased) > 10 * se
    f1, f2 = rng.standard_normal((300, 8)), rng.standard_normal((300, 8)) + 0.5
    shifted = ev.kernel_inception_distance(f1, torch.from_numpy(f2), subsets=10, subset_size=100)
    assert shifted["value"] > 20 * se and shifted["subset_size"] == 100 and shifted["subsets"] == 10


def test_kid_caps_subset_size_at_sample_count_and_is_seeded():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((30, 4)), rng.standard_normal((50, 4))
    r1 = ev.kernel_inception_distance(a, b, subsets=5, subset_size=1000, seed=1)
    r2 = ev.kernel_inception_distance(a, b, subsets=5, subset_size=1000, seed=1)
    assert r1["subset_size"] == 30 and r1 == r2
    with pytest.raises(UsageError):
        ev.kernel_inception_distance(a[:1], b)


# ---------------------------------------------------------------- bits/dim bookkeeping


def test_bits_per_dim_terms_counts_and_progress():
    s = Schedule.create("cosine", 20)
    images = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    zero_eps = lambda x, t, cond=None: torch.zeros_like(x)  # noqa: E731 - the "predict no noise" model
    events = []
    exact = ev.bits_per_dim(zero_eps, s, images, batch_size=2, on_event=events.append)
    assert exact.n == 5 and exact.evaluated == 20 and exact.exact
    assert math.isfinite(exact.total) and exact.total > 0 and exact.total_sem > 0
    assert exact.total == pytest.approx(exact.prior + exact.kl + exact.decoder, rel=1e-6)
    progress = [e for e in events if e["event"] == "progress"]
    assert progress[-1]["final"] and progress[-1]["done"] == 5 and progress[-1]["stage"] == "bits/dim"
    strided = ev.bits_per_dim(zero_eps, s, images, stride=4, batch_size=8)
    assert not strided.exact and strided.evaluated < 20 and "stratified" in strided.note
    d = strided.to_dict()
    assert set(d["terms"]) == {"prior", "kl", "decoder"} and d["stride"] == 4 and not d["exact"]
    with pytest.raises(UsageError):
        ev.bits_per_dim(zero_eps, s, images.float())


# ---------------------------------------------------------------- cache, log, metric names


class _CountingExtractor:
    """Stands in for the Inception network: mean colour per channel, padded to 4 features."""

    weights_id = "f" * 64

    def __init__(self):
        self.images = 0

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        self.images += imgs.shape[0]
        m = imgs.float().mean(dim=(2, 3))
        return torch.cat([m, m.sum(1, keepdim=True) / 3], dim=1)


def test_reference_stats_cache_roundtrip(tmp_path):
    imgs = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    ext = _CountingExtractor()
    first = ev.reference_stats(imgs, ext, cache_dir=tmp_path / "c", label="toy train", batch_size=4)
    assert not first.cached and ext.images == 10 and first.n == 10
    assert first.path is not None and first.path.parent == tmp_path / "c" and first.path.suffix == ".npz"
    with np.load(first.path, allow_pickle=False) as z:  # no pickled objects inside
        assert set(z.files) == {"mu", "sigma", "features", "meta"}
    again = ev.reference_stats(imgs, ext, cache_dir=tmp_path / "c", label="toy train")
    assert again.cached and ext.images == 10  # not recomputed
    np.testing.assert_array_equal(again.sigma, first.sigma)
    other = ev.reference_stats(imgs.flip(0)[:9], ext, cache_dir=tmp_path / "c", label="toy train")
    assert not other.cached and other.path != first.path  # different images, different file
    first.path.write_bytes(b"not an npz")  # a damaged cache is recomputed, not trusted
    fixed = ev.reference_stats(imgs, ext, cache_dir=tmp_path / "c", label="toy train")
    assert not fixed.cached and np.allclose(fixed.mu, first.mu)


def test_eval_log_appends(tmp_path):
    rundir.append_eval_log(tmp_path, {"a": 1})
    rundir.append_eval_log(tmp_path, {"a": 2})
    assert [r["a"] for r in rundir.read_eval_log(tmp_path)] == [1, 2]


def test_parse_metrics():
    assert ev.parse_metrics("kid, bpd") == ["bpd", "kid"]
    with pytest.raises(UsageError, match="bpd, fid, kid"):
        ev.parse_metrics("bpd,is")


def test_human_output_names_sample_counts():
    from ddpmctl.cli.eval import human_lines

    ref = {"split": "train", "n": 50000}
    rec = {"metrics": {"fid": {"value": 12.3, "n": 1000, "biased_upward": True, "reference": ref},
                       "kid": {"value": 0.01, "std": 0.001, "n": 1000, "subsets": 100, "subset_size": 1000,
                               "reference": ref}},
           "sampler": "ddim", "steps": 50, "seed": 0, "n_samples": 1000}
    lines = human_lines(rec)
    assert lines[0].startswith("FID 12.30 (n=1,000; fewer than 50,000 samples: biased upward")
    assert "KID" in lines[1] and "n=1,000" in lines[1]
    rec["metrics"]["fid"].update(n=50000, biased_upward=False)
    assert "biased" not in human_lines(rec)[0]


class Payload:  # anything but tensors needs the full unpickler, which read_weights refuses
    pass


def test_weights_reader_never_unpickles(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(1), "obj": Payload()}, bad)
    with pytest.raises(UsageError, match="plain PyTorch state dict"):
        ev.read_weights(bad)
    with pytest.raises(UsageError, match="--inception-weights"):
        ev.read_weights(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- Inception features (needs the extra)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory) -> Path:
    """torch-fidelity's FID Inception-v3 with random (He-normal) weights, saved as safetensors."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3", reason=NEEDS_EXTRA)
    import io
    from unittest import mock

    from safetensors.torch import save_file

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(0)
    # Stub the third-party weight loading: build the architecture only.
    with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):  # keep activations O(1) through 90-odd layers
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "random-inception.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_inception_feature_pipeline(random_inception, tmp_path):
    ext = ev.load_inception(random_inception)
    imgs = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    imgs[1] = imgs[0, :1].expand(3, 32, 32)  # a grey image stored as RGB
    f = ext(imgs)
    assert f.shape == (2, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert f.abs().max() > 1e-3 and (f[0] - f[1]).abs().max() > 1e-4  # informative, image-dependent
    assert torch.allclose(ext(imgs[:1, :1]), f[1:], atol=1e-5)  # 1-channel input is repeated to RGB
    # The same weights as a plain .pth state dict (read with weights_only=True) have the same identity.
    from safetensors.torch import load_file, save_file

    pth = tmp_path / "same.pth"
    torch.save(load_file(str(random_inception)), pth)
    assert ev.weights_digest(ev.read_weights(pth)) == ext.weights_id
    wrong = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(wrong))
    with pytest.raises(UsageError, match="not the FID Inception-v3 weights"):
        ev.load_inception(wrong)


# ---------------------------------------------------------------- the CLI on a tiny trained run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from conftest import run_cli

    base = tmp_path_factory.mktemp("evalrun")
    env = {"DDPMCTL_DATA": str(base / "data")}
    # T = 100 (not 1000) keeps bits/dim cheap: --stride 10 needs 20 network calls per batch.
    r = run_cli("train", "shapes", "--max-steps", "4", "--batch-size", "8", *TINY, "--set", "diffusion.timesteps=100",
                "--out", "RUN", cwd=base, env=env)
    assert r.returncode == 0, r.stderr
    return base / "RUN"


def test_eval_bpd_json_on_shapes(run_dir, cli):
    r = cli("eval", str(run_dir), "--data", "shapes", "--n", "4", "--stride", "10", "--json")  # default: bpd
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["metrics"]) == {"bpd"}  # what runs on a default install (no [eval] extra)
    b = out["metrics"]["bpd"]
    t = b["terms"]
    assert all(math.isfinite(v) for v in (b["bits_per_dim"], t["prior"], t["kl"], t["decoder"]))
    assert b["bits_per_dim"] == pytest.approx(t["prior"] + t["kl"] + t["decoder"], rel=1e-6)
    assert 0 < b["bits_per_dim"] < 100 and t["kl"] > 0 and t["decoder"] > 0
    assert b["n"] == 4 and b["split"] == "test" and b["stride"] == 10 and not b["exact"]
    assert b["timesteps"] == 100 and b["network_evaluations_per_image"] == 20
    assert "stratified" in b["note"] and "--stride 1" in r.stderr  # the estimator is stated
    log = rundir.read_eval_log(run_dir)
    assert log[-1]["checkpoint"] == "step_00000004" and log[-1]["metrics"]["bpd"] == b
    assert out["log"] == str(run_dir / "eval.jsonl")


def test_eval_bpd_of_one_image_has_no_standard_error_and_is_logged(run_dir, cli):
    """One image has no spread: the standard error is null (it was NaN, which eval.jsonl refused)."""
    r = cli("eval", str(run_dir), "--data", "shapes", "--metric", "bpd", "--n", "1", "--stride", "10", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["bpd"]["sem"] is None
    assert rundir.read_eval_log(run_dir)[-1]["metrics"]["bpd"]["sem"] is None


def test_eval_says_when_the_split_holds_fewer_images_than_n(run_dir, monkeypatch, capsys, tmp_path):
    from conftest import make_images, run_main

    folder = make_images(tmp_path / "three", n=3)
    code, out, err = run_main(monkeypatch, capsys, "eval", str(run_dir), "--data", str(folder), "--split", "train",
                              "--n", "1000", "--stride", "10", "--no-log", "--json")
    assert code == 0, err
    assert json.loads(out)["metrics"]["bpd"]["n"] == 3
    assert "--n 1,000: the train split holds 3 images, so bits/dim uses all 3" in err
    assert err.count("bits/dim: 3/3 images") == 1  # the count line once (it once came twice)


def test_eval_without_extra_names_the_install(run_dir, cli, tmp_path):
    shim = tmp_path / "shim" / "torch_fidelity"  # makes `import torch_fidelity` fail, installed or not
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'torch_fidelity'\")\n")
    r = cli("eval", str(run_dir), "--metric", "fid", "--n", "4", env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "shim"), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 2, r.stderr
    assert "pip install '.[eval]'" in r.stderr and "pipx inject ddpmctl 'torch-fidelity" in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_missing_weights_file_is_a_usage_error(tmp_path):
    """Checked before the extra is imported or anything slow runs; UsageError means exit code 2."""
    with pytest.raises(UsageError, match="--inception-weights .*nope.safetensors: no such file") as exc:
        ev.load_inception(tmp_path / "nope.safetensors")
    assert exc.value.exit_code == 2


def test_eval_fid_kid_end_to_end(run_dir, random_inception, cli, tmp_path):
    """Samples -> features -> FID/KID against a 3-image folder, with cached reference statistics."""
    from ddpmctl.images import save_png

    folder = tmp_path / "ref"
    folder.mkdir()
    for i in range(3):
        save_png(folder / f"{i}.png", torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8))
    r = cli("eval", str(run_dir), "--data", str(folder), "--split", "train", "--metric", "fid,kid", "--n", "2",
            "--steps", "2", "--kid-subsets", "3", "--inception-weights", str(random_inception), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    fid, kid = out["metrics"]["fid"], out["metrics"]["kid"]
    assert math.isfinite(fid["value"]) and fid["value"] > 0
    assert fid["n"] == 2 and fid["biased_upward"] and fid["reference"] == {**fid["reference"], "n": 3,
                                                                           "split": "train", "cached": False}
    assert math.isfinite(kid["value"]) and kid["subset_size"] == 2 and kid["subsets"] == 3
    own = json.loads((run_dir / "spec.json").read_text())["sample"]  # no --sampler: the run's own, as `sample`
    assert out["sampler"] == own["sampler"] and out["eta"] == own["eta"]
    assert out["steps"] == 2 and out["n_samples"] == 2
    cache = Path(fid["reference"]["cache"])
    assert cache.is_file() and cache.parent == tmp_path / "data-root" / ".cache" / "inception-stats"
    log = rundir.read_eval_log(run_dir)[-1]
    assert log["sampler"] == own["sampler"] and log["n_samples"] == 2 and log["metrics"]["fid"]["value"] == fid["value"]


def test_eval_of_a_conditional_model_reports_fid_kid_per_class(random_inception, cli, tmp_path):
    """Samples cycle through the classes with the run's guidance; each class is scored against the reference
    images of the same name (the reference folder lists its classes in another order on purpose)."""
    from ddpmctl.images import save_png

    r = cli("train", "shapes", "--conditional", "--max-steps", "2", "--batch-size", "4", *TINY, "--out", "RUN")
    assert r.returncode == 0, r.stderr
    for name in ("triangle", "circle", "square", "hexagon"):  # sorted: circle, hexagon, square, triangle
        (tmp_path / "ref" / name).mkdir(parents=True)
        for i in range(2):
            save_png(tmp_path / "ref" / name / f"{i}.png", torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8))
    r = cli("eval", "RUN", "--data", "ref", "--split", "train", "--metric", "fid,kid", "--n", "6", "--steps", "1",
            "--guidance", "1.5", "--kid-subsets", "2", "--inception-weights", str(random_inception), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["guidance"] == 1.5
    for m in ("fid", "kid"):
        per = out["metrics"][m]["per_class"]
        assert list(per) == ["circle", "square", "triangle"] and all(math.isfinite(v) for v in per.values())
    from ddpmctl.cli.eval import human_lines

    lines = human_lines(out)
    assert any(ln.startswith("FID per class: circle ") for ln in lines), lines
    assert lines[-1].endswith(", classes in turn, guidance 1.5"), lines
