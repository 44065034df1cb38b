"""t2iedit: null-space constrained, entity-aware knowledge editing of text-to-image diffusion models.

The library layer: math, model adapters, losses, metrics and I/O formats. No Prefect, no DVC,
no paths from params.yaml and no global state live here (see docs/STYLE.md).
"""

__version__ = "0.1.0"
