"""Prefect tasks: read an artifact, call the library, write an artifact, return its Path.

Importing this package sets Prefect's environment defaults (before Prefect reads its settings), so
every entry point — ``python -m flows.<stage>``, tests, notebooks — gets the same offline behaviour.
"""

import os

# Defaults only: a user's own environment (e.g. PREFECT_API_URL of a running server) always wins.
PREFECT_ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "DO_NOT_TRACK": "1",
}


def set_prefect_env_defaults() -> None:
    for key, value in PREFECT_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


set_prefect_env_defaults()

from t2iedit.library_warnings import silence_known_warnings  # noqa: E402  (before diffusers logs them)

silence_known_warnings()
