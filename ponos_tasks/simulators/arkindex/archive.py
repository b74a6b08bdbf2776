"""Model archives in the format base-worker's bootstrap extracts: a tar compressed with zstd."""

from __future__ import annotations

import io
import tarfile

import zstandard


def tar_zst(files: dict[str, str | bytes]) -> bytes:
    """A .tar.zst archive holding `files` (name -> content; str is written as UTF-8)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in sorted(files.items()):
            data = content.encode() if isinstance(content, str) else bytes(content)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return zstandard.ZstdCompressor().compress(buffer.getvalue())


def untar_zst(archive: bytes) -> dict[str, bytes]:
    """The inverse of `tar_zst` (used by tests and the admin API)."""
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(archive)).read()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
