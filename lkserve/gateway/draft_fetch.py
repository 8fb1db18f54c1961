"""Fetch an announced draft checkpoint over HTTP from the worker (lkserve.trainer.http), for gateways that do not
share the worker's filesystem. The weights' sha256 is checked while downloading; nothing lands in the fetch
directory unless it matches (temp dir + rename), so a half-fetched or tampered checkpoint is never swapped in."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import httpx

from lkserve.checkpoint import WEIGHTS_FILE, atomic_dir, sha256_file

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


class FetchError(RuntimeError):
    pass


async def fetch_checkpoint(url: str, version: str, sha256: str, dest_root: str | Path,
                           timeout: float = 120.0) -> Path:
    """Download <url>/ (manifest) and its files into <dest_root>/<version>; return that directory."""
    if not _NAME.match(version):
        raise FetchError(f"unsafe version name {version!r}")
    final = Path(dest_root) / version
    if (final / WEIGHTS_FILE).is_file() and sha256_file(final / WEIGHTS_FILE) == sha256:
        return final  # fetched before
    try:
        with atomic_dir(final, replace=True) as tmp:
            async with httpx.AsyncClient(timeout=timeout) as client:
                manifest = (await client.get(url.rstrip("/") + "/")).raise_for_status().json()
                names = [f["name"] for f in manifest.get("files", [])]
                if WEIGHTS_FILE not in names or "config.json" not in names:
                    raise FetchError(f"{url}: not a checkpoint (files: {names})")
                weights_sha = None
                for name in names:
                    if not _NAME.match(name):
                        raise FetchError(f"{url}: unsafe file name {name!r}")
                    h = hashlib.sha256()
                    async with client.stream("GET", f"{url.rstrip('/')}/{name}") as resp:
                        resp.raise_for_status()
                        with open(tmp / name, "wb") as f:  # noqa: ASYNC230 - local disk, chunks of 1 MiB
                            async for chunk in resp.aiter_bytes(1 << 20):
                                f.write(chunk)
                                h.update(chunk)
                    if name == WEIGHTS_FILE:
                        weights_sha = h.hexdigest()
            if weights_sha != sha256:
                raise FetchError(f"{url}: {WEIGHTS_FILE} hashes to {str(weights_sha)[:12]}, announced {sha256[:12]}")
    except httpx.HTTPError as e:
        raise FetchError(f"fetching {url}: {e!r}") from None
    return final
