"""A safetensors file written in place and read memory-mapped: the on-disk format of the teacher caches.

``safetensors.torch.save_file`` needs every tensor in RAM and ``load_file`` reads every tensor into RAM; a cache of a
COCO-sized split (860k boxes; 29 GB of pooled GT features) must do neither. :func:`create` writes the header of a
file whose tensors' shapes are known in advance, sizes the file (sparse: the data is not written yet) and returns it
open for writing rows in place; :func:`open_tensors` maps an existing file and returns its tensors as views of
the map (only the rows that are read come into memory, and ranks on one node share the page cache). Builds write
rows with ``pwrite`` (:class:`TableFile`), so that a build's resident memory does not grow with the file.

The layout is the safetensors format itself (8-byte little-endian header length, JSON header, one contiguous byte
buffer), so ``safetensors.safe_open`` / ``load_file`` read these files too. The header is padded to a multiple of 8
bytes and the 8-byte tensors come first, so every tensor starts at an offset aligned for its dtype.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Literal

import numpy as np

MemmapMode = Literal["r", "c", "r+", "w+", "readonly", "copyonwrite", "readwrite", "write"]  # numpy.memmap's

DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64, "U8": np.uint8}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def create(path: str | Path, specs: dict[str, tuple], metadata: dict[str, str]) -> TableFile:
    """Preallocate ``path`` for tensors ``{name: (numpy dtype, shape)}`` with string ``metadata`` (sparse: zeros
    until written); returns it open for :meth:`TableFile.write`."""
    names = sorted(specs, key=lambda n: -np.dtype(specs[n][0]).itemsize)  # stable: widest dtypes first (alignment)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    start = 0
    for name in names:
        dtype, shape = np.dtype(specs[name][0]), [int(s) for s in specs[name][1]]
        end = start + dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": CODES[dtype], "shape": shape, "data_offsets": [start, end]}
        start = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # the buffer starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.truncate(8 + len(text) + start)
    return TableFile(path, writable=True)


class TableFile:
    """Rows of the tensors of a file in this format, read (``pread``) and written (``pwrite``) in place.

    Unlike a memory map, the pages read or written here stay in the page cache and never count in the process's
    resident set: building a cache of any size takes the memory of the rows in flight only."""

    def __init__(self, path: str | Path, *, writable: bool = False) -> None:
        self.entries, self.metadata, self.base = read_header(path)
        self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def _where(self, name: str, row: int) -> tuple[np.dtype, int, int]:
        """(dtype, bytes per row, byte offset of ``row``) of tensor ``name`` (rows along its first dimension)."""
        entry = self.entries[name]
        dtype = np.dtype(DTYPES[entry["dtype"]])
        row_bytes = dtype.itemsize * math.prod(entry["shape"][1:])
        return dtype, row_bytes, self.base + entry["data_offsets"][0] + row * row_bytes

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``name``, a new array."""
        dtype, row_bytes, offset = self._where(name, start)
        out = np.empty((stop - start, *self.shape(name)[1:]), dtype)
        # the ignores: numpy's stubs declare ndarray.__buffer__ for Python >= 3.12 only
        view, done = memoryview(out.reshape(-1).view(np.uint8)), 0  # type: ignore[arg-type]
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"short read in tensor {name!r}")
            done += got
        return out

    def write(self, name: str, start: int, rows: np.ndarray) -> None:
        """Rows ``start:start + len(rows)`` of ``name`` <- ``rows`` (converted to its dtype)."""
        dtype, _, offset = self._where(name, start)
        view, done = memoryview(np.ascontiguousarray(rows, dtype).reshape(-1).view(np.uint8)), 0  # type: ignore[arg-type]
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def close(self, *, sync: bool = False) -> None:
        """Close; with ``sync``, first make the writes durable (another node reads the file next)."""
        if sync:
            os.fsync(self.fd)
        os.close(self.fd)


def read_header(path: str | Path) -> tuple[dict, dict[str, str], int]:
    """(tensor entries, metadata, byte offset of the buffer) of a safetensors file; reads the header only."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + length


def open_tensors(path: str | Path, *, mode: MemmapMode = "c") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Map ``path`` and return ({name: array viewing the map}, metadata).

    ``mode``: numpy's memmap mode; the default "c" (copy-on-write) maps the file read-only for the disk, and lets
    torch wrap the arrays without a copy (a write, if any, would stay private to the process)."""
    entries, metadata, base = read_header(path)
    mapped = np.memmap(path, dtype=np.uint8, mode=mode)  # the whole file, one map
    arrays = {}
    for name, entry in entries.items():
        dtype = np.dtype(DTYPES[entry["dtype"]])
        begin, end = (base + o for o in entry["data_offsets"])
        raw = mapped[begin:end]
        if begin % dtype.itemsize:  # not a file this module wrote: misaligned, so copy rather than view
            raw = np.array(raw)
        arrays[name] = raw.view(dtype).reshape(entry["shape"])
    return arrays, metadata
