"""Optional dependencies: which extra of the package provides each, for a one-line error when missing.

``deltatl train`` needs only PyTorch, torchvision, timm and the embedded weights; a command that
imports one of these modules and does not find it tells the user which extra to install.
"""
from __future__ import annotations

EXTRA_OF_MODULE = {"optuna": "search", "matplotlib": "analysis", "scipy": "analysis", "psycopg": "postgres",
                   "tensorboard": "tensorboard", "onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx"}


def missing_extra_message(error: ModuleNotFoundError) -> str | None:
    """``needs X: pip install 'deltatl[extra]'`` if ``error`` is a missing optional dependency, else None."""
    module = (error.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return f"this needs {module}, which deltatl's '{extra}' extra installs: pip install 'deltatl[{extra}]'"
