"""Prefect flows: one per DVC stage (``python -m flows.<stage>``) and ``flows.pipeline`` for all of them."""

import tasks  # noqa: F401  (sets Prefect's environment defaults before Prefect is imported)
