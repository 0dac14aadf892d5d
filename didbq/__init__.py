"""didbq: binarize any timm Vision Transformer with the DIDB-ViT method."""
from __future__ import annotations

from didbq._compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"

from didbq.convert import binarize_model, build_model, load_recipe, plan  # noqa: E402
from didbq.export import load  # noqa: E402

__all__ = ["__version__", "binarize_model", "build_model", "load", "load_recipe", "plan"]
