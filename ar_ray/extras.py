"""Optional extras (`ar-ray[export]`, `[serve]`, `[mlflow]`): asked for by name, before any work.

A command whose extra is missing fails with one line naming the package and the pip command
that installs it, rather than with an ImportError from deep inside its first import.
"""

from __future__ import annotations

from importlib import import_module

from ar_ray.errors import UserError

EXTRA_PACKAGES = {
    "export": ("onnx", "onnxruntime", "onnxscript"),  # onnxscript: torch.onnx's exporter
    "serve": ("fastapi", "starlette", "uvicorn", "python_multipart"),  # ray[serve] + forms
    "mlflow": ("mlflow",),  # --track mlflow
}


def require_extra(extra: str) -> None:
    """Refuse `ar-ray <extra>` while one of its packages cannot be imported."""
    for package in EXTRA_PACKAGES[extra]:
        try:
            import_module(package)
        except ImportError:
            raise UserError(f"{extra} needs {package}: pip install 'ar-ray[{extra}]'") from None
