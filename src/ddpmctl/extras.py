"""How to install an optional extra, said the same way by every message and help text that needs one.

ddpmctl installs from its repository (it is not on PyPI yet): ``pip install '.[EXTRA]'`` in a checkout,
or, for a pipx install, ``pipx inject ddpmctl PACKAGES`` (pipx has no extras for a local path once
installed). The pipx packages are those of the extra in pyproject.toml (tests/test_cli.py keeps them
equal), less ``gradio_client``, which gradio itself pins: naming it too makes pipx warn.
"""

from __future__ import annotations

PIPX_PACKAGES = {
    "demo": ("gradio>=6,<7",),
    "eval": ("torch-fidelity>=0.4,<0.5",),
    "onnx": ("onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2"),
}


def install_hint(extra: str) -> str:
    """``pip install '.[eval]'`` (in the ddpmctl checkout; with pipx: ``pipx inject ddpmctl ...``)."""
    packages = " ".join(f"'{p}'" for p in PIPX_PACKAGES[extra])
    return f"pip install '.[{extra}]' in the ddpmctl checkout (with pipx: pipx inject ddpmctl {packages})"
