"""Dataset locations: local directories or object-storage URLs (read through litdata), and reading small JSON files
from either."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from difflab.utils.errors import ConfigError, CorruptDataError, DataNotFoundError

URL_PREFIXES = ("s3://", "gs://", "gcs://", "azure://", "r2://", "hf://", "local:")
INSTALL = "pip install 'difflab[stream]'"


def require_litdata(needed_for: str):
    """Import litdata or raise a one-line ConfigError naming the extra that brings it."""
    try:
        import litdata
    except ImportError:
        raise ConfigError(
            f"{needed_for} needs the optional package litdata: {INSTALL} (or pip install litdata)"
        ) from None
    return litdata


def is_url(location: str | Path) -> bool:
    """Whether ``location`` names object storage (read through litdata) rather than a local directory."""
    return str(location).startswith(URL_PREFIXES)


def join(location: str | Path, *parts: str) -> str:
    """``location/part/...`` for a local path or a URL (Path would fold the ``//`` of ``s3://``)."""
    if is_url(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return str(Path(location).expanduser().joinpath(*parts))


def fetch_json(location: str, name: str, storage_options: dict | None = None) -> Any | None:
    """JSON file ``name`` under ``location`` (local or object storage), or None when it does not exist."""
    path = join(location, name)
    if not is_url(location):
        p = Path(path)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise CorruptDataError(
                f"{p} is unreadable ({e}); rewrite the shards with encode_latents.py format=shards overwrite=true"
            ) from e
    require_litdata(f"reading {location}")
    from litdata.streaming.downloader import get_downloader

    with tempfile.TemporaryDirectory(prefix="difflab_shards_") as tmp:
        local = str(Path(tmp) / Path(name).name)
        try:
            get_downloader(str(location), tmp, [], storage_options).download_file(path, local)
            text = Path(local).read_text()
        except Exception as e:  # a missing object is a provider-specific error (botocore ClientError, ...)
            first = str(e).splitlines()[0] if str(e) else ""
            if isinstance(e, FileNotFoundError) or any(w in first for w in ("404", "Not Found", "NoSuchKey")):
                return None
            raise DataNotFoundError(
                f"cannot read {path} ({type(e).__name__}: {first}); check the URL and the "
                f"storage credentials (datamodule.storage_options)"
            ) from e
    try:
        return json.loads(text)
    except ValueError as e:
        raise CorruptDataError(f"{path} is unreadable ({e}); rewrite the shards") from e
