"""ONNX export of a model folder's denoiser, and the check that onnxruntime agrees with PyTorch.

The file takes x_t float32 (N, C, H, W) and t int64 (N,) and returns the network's prediction,
float32, with a dynamic batch axis. onnx and onnxruntime are optional (:func:`ddpmctl.extras.install_hint`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ddpmctl.errors import DdpmctlError, UsageError
from ddpmctl.extras import install_hint
from ddpmctl.spec import RunSpec

ONNX_ATOL = 1e-3  # max |onnxruntime - PyTorch| accepted, relative to max(1, max |PyTorch|)


def require_onnx() -> None:
    missing = []
    for mod in ("onnx", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise UsageError(f"--format onnx needs {' and '.join(missing)}: {install_hint('onnx')}")


def onnx_opset(path: Path) -> int | None:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


def export_onnx(model: torch.nn.Module, spec: RunSpec, path: Path, *, atol: float = ONNX_ATOL) -> float:
    """Write the denoiser (x_t float32 (N, C, H, W), t int64 (N,)[, class_labels int64 (N,) for a conditional
    model, the class count meaning no class]) -> prediction with a dynamic batch axis, then run it with onnxruntime on a batch of another size and compare with PyTorch.

    Returns the max absolute difference; raises when it exceeds atol * max(1, max |PyTorch|).
    """
    require_onnx()
    import onnxruntime as ort

    model = model.float().cpu().eval()
    c, size, T = spec.model.channels, spec.model.image_size, spec.diffusion.timesteps
    k = spec.model.num_classes
    gen = torch.Generator().manual_seed(0)
    example = (torch.randn(2, c, size, size, generator=gen), torch.randint(0, T, (2,), generator=gen))
    if k:  # a conditional model takes a third input: class labels, k = the null class (unguided)
        model = _WithLabels(model)
        example += (torch.tensor([0, k], dtype=torch.int64),)
    try:
        _torch_onnx_export(model, example, path)
    except Exception as exc:  # noqa: BLE001 - any exporter failure becomes one message
        raise DdpmctlError(f"ONNX export failed ({exc.__class__.__name__}: {str(exc).splitlines()[0][:300]})") from None
    x = torch.randn(3, c, size, size, generator=gen)
    t = torch.tensor([0, T // 2, T - 1], dtype=torch.int64)
    inputs = (x, t) + ((torch.tensor([0, k - 1, k], dtype=torch.int64),) if k else ())
    with torch.no_grad():
        ref = model(*inputs)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    got = torch.from_numpy(sess.run(None, {n: v.numpy() for n, v in zip(names, inputs)})[0])
    if got.shape != ref.shape:
        raise DdpmctlError(f"ONNX check failed: output shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
    diff = float((got - ref).abs().max())
    bound = atol * max(1.0, float(ref.abs().max()))
    if not diff <= bound:
        raise DdpmctlError(f"ONNX check failed: onnxruntime differs from PyTorch by {diff:.3g} > {bound:.3g}")
    return diff


class _WithLabels(torch.nn.Module):
    """A conditional denoiser as ONNX sees it: (x_t, t, class_labels) -> prediction."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        from ddpmctl.cond import Cond

        return self.model(x_t, t, Cond(labels=class_labels))


def _torch_onnx_export(model: torch.nn.Module, example: tuple, path: Path) -> None:
    """TorchScript exporter first (about 1 s), the dynamo exporter (needs onnxscript) if that fails.
    Both print progress and warnings; the library never prints, so they are swallowed."""
    import contextlib
    import io
    import warnings

    inputs = ["x_t", "t", "class_labels"][:len(example)]
    names = {"input_names": inputs, "output_names": ["prediction"]}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, example, str(path), opset_version=17, dynamo=False,
                              dynamic_axes={**{n: {0: "batch"} for n in inputs}, "prediction": {0: "batch"}},
                              **names)
            return
        except Exception:  # noqa: BLE001 - the legacy exporter is deprecated; try the new one
            path.unlink(missing_ok=True)
        batch = torch.export.Dim("batch", min=1, max=4096)
        params = ("x", "t") if len(example) == 2 else inputs  # the forward's parameter names
        prog = torch.onnx.export(model, example, dynamo=True, verbose=False,
                                 dynamic_shapes={a: {0: batch} for a in params}, **names)
        prog.save(str(path))
