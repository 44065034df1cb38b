"""Raw files: fetch them from their upstream repositories at pinned commits, or use the vendored
copies, and verify every byte against the checked-in manifest (data/raw/MANIFEST.json).

A checksum mismatch is always an error. ``mode="auto"`` uses the vendored copy only when upstream
cannot be reached (a network error, logged and recorded per file), never when it sends other bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from t2iedit.edit_data.schema import DatasetError
from t2iedit.storage import file_sha256, write_bytes

log = logging.getLogger(__name__)

GITHUB_RAW = "https://raw.githubusercontent.com"
DownloadMode = Literal["offline", "online", "auto"]


@dataclass(frozen=True)
class RawFile:
    path: str  # relative to the raw folder, e.g. TIMED/TIMED_test_set.csv
    repo: str  # owner/name on GitHub
    commit: str  # pinned 40-hex commit
    upstream_path: str  # path inside the repository
    sha256: str
    license: str = ""

    def url(self, base_url: str = GITHUB_RAW) -> str:
        return f"{base_url.rstrip('/')}/{self.repo}/{self.commit}/{self.upstream_path}"


def read_manifest(path: str | os.PathLike) -> list[RawFile]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    fields = RawFile.__dataclass_fields__
    return [RawFile(**{k: v for k, v in f.items() if k in fields}) for f in data["files"]]


def http_get(url: str, timeout: float = 30.0) -> bytes:
    """Fetch ``url`` (https:// or file://)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _check(data_sha: str, f: RawFile, origin: str) -> None:
    if data_sha != f.sha256:
        raise DatasetError(f"{f.path}: sha256 mismatch for {origin}: got {data_sha}, manifest says {f.sha256}")


def verify_raw(raw_dir: str | os.PathLike, manifest: list[RawFile]) -> None:
    """Raise ``DatasetError`` unless every manifest file exists under ``raw_dir`` with its sha256."""
    raw_dir = Path(raw_dir)
    for f in manifest:
        p = raw_dir / f.path
        if not p.is_file():
            raise DatasetError(f"{p}: missing (listed in the raw-data manifest)")
        _check(file_sha256(p), f, str(p))


def fetch_raw(dest: str | os.PathLike, manifest: list[RawFile], *, mode: DownloadMode = "offline",
              vendored: str | os.PathLike | None = None, base_url: str = GITHUB_RAW,
              fetch: Callable[[str], bytes] = http_get) -> dict[str, str]:
    """Materialise every manifest file under ``dest``, verified; return ``{path: origin}``.

    ``offline``: copy from ``vendored`` (or verify in place when ``dest`` is ``vendored``).
    ``online``: download ``base_url/<repo>/<commit>/<path>``; any failure raises.
    ``auto``: download; on a network error (not a mismatch) fall back to the vendored copy, logged.
    """
    if mode not in ("offline", "online", "auto"):
        raise DatasetError(f"unknown download mode {mode!r}")
    if mode in ("offline", "auto") and vendored is None:
        raise DatasetError(f"download mode {mode!r} needs the vendored folder")
    dest = Path(dest)
    origins: dict[str, str] = {}
    for f in manifest:
        target = dest / f.path
        if mode != "offline":
            url = f.url(base_url)
            try:
                data = fetch(url)
            except (urllib.error.URLError, OSError) as err:
                if mode == "online":
                    raise DatasetError(f"{f.path}: cannot fetch {url}: {err}") from err
                log.warning("%s: cannot fetch %s (%s); using the vendored copy", f.path, url, err)
            else:
                _check(hashlib.sha256(data).hexdigest(), f, url)
                write_bytes(target, data)
                origins[f.path] = url
                continue
        source = Path(vendored) / f.path
        if not source.is_file():
            raise DatasetError(f"{source}: missing (listed in the raw-data manifest)")
        _check(file_sha256(source), f, str(source))
        if source.resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            _check(file_sha256(target), f, str(target))
        origins[f.path] = f"vendored:{source}"
    return origins
