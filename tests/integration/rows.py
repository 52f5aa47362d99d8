"""Searching files for rows of data: every row's feature vector as float32 and float64 bytes
(little-endian) and as text (JSON, comma- and space-separated ``repr`` of each value), anywhere
in a file's bytes (and in each member of a zip archive, e.g. a ``torch.save`` file), and as a
row of any Parquet or CSV table found.

The byte search is a rolling hash (mod 2**64, numpy) of every window of the shortest encoding's
length, looked up among the hashes of each encoding's anchor window (its first or last bytes,
whichever holds more distinct values), each hit then compared in full: exact, and fast enough
for the tens of megabytes of a Prefect database."""

from __future__ import annotations

import io
import json
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

_P = 0x100000001B3  # odd: invertible mod 2**64
_MOD = 1 << 64
_CHUNK = 1 << 22
_BUCKET_BITS = 24


def _powers(base: int, n: int) -> np.ndarray:
    out = np.ones(n, dtype=np.uint64)
    if n > 1:
        out[1:] = np.cumprod(np.full(n - 1, base, dtype=np.uint64))  # wraps mod 2**64
    return out


def encodings(row: np.ndarray) -> dict[str, bytes]:
    """A feature vector (float32 values) as it could be written down."""
    values = [float(v) for v in np.asarray(row, dtype=np.float32)]
    texts = [repr(v) for v in values]
    return {
        "float32": np.asarray(values, dtype="<f4").tobytes(),
        "float64": np.asarray(values, dtype="<f8").tobytes(),
        "json": json.dumps(values).encode(),
        "comma-space text": ", ".join(texts).encode(),
        "comma text": ",".join(texts).encode(),
        "space text": " ".join(texts).encode(),
    }


@dataclass(frozen=True)
class Hit:
    site: str
    row: int
    encoding: str
    where: str

    def __str__(self) -> str:
        return f"{self.where}: site '{self.site}' row {self.row} ({self.encoding})"


class RowFinder:
    """Finds any of ``rows`` (site -> array of feature vectors, one a row) in files."""

    def __init__(self, rows: dict[str, np.ndarray]) -> None:
        self.patterns: list[tuple[bytes, str, int, str]] = []
        self.float32: dict[bytes, list[tuple[str, int]]] = defaultdict(list)
        self.width = 0
        for site, table in rows.items():
            table = np.asarray(table, dtype=np.float32)
            self.width = table.shape[1]
            for i, row in enumerate(table):
                for name, blob in encodings(row).items():
                    self.patterns.append((blob, site, i, name))
                self.float32[row.astype("<f4").tobytes()].append((site, i))
        self.m = min(len(p[0]) for p in self.patterns)
        self._pw = _powers(_P, _CHUNK + self.m)
        self._ipw = _powers(pow(_P, -1, _MOD), _CHUNK + 1)
        offsets, windows = [], []
        for blob, *_ in self.patterns:
            head, tail = blob[: self.m], blob[-self.m :]
            offsets.append(0 if len(set(head)) >= len(set(tail)) else len(blob) - self.m)
            windows.append(blob[offsets[-1] : offsets[-1] + self.m])
        matrix = np.frombuffer(b"".join(windows), dtype=np.uint8).reshape(len(windows), self.m)
        keys = (matrix.astype(np.uint64) * self._pw[: self.m]).sum(axis=1, dtype=np.uint64)
        anchors: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for index, (key, offset) in enumerate(zip(keys.tolist(), offsets, strict=True)):
            anchors[key].append((index, offset))
        self.anchors = dict(anchors)
        self._buckets = np.zeros(1 << _BUCKET_BITS, dtype=bool)  # a first filter, cheap
        self._buckets[keys >> np.uint64(64 - _BUCKET_BITS)] = True

    def _hashes(self, seg: np.ndarray) -> np.ndarray:
        """The hash of every window of ``m`` bytes of ``seg`` (at most _CHUNK + m - 1 bytes)."""
        n, m = len(seg), self.m
        weighted = seg.astype(np.uint64)
        weighted *= self._pw[:n]  # wraps mod 2**64, as every step here
        sums = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(weighted, out=sums[1:])
        hashes = sums[m:] - sums[:-m]
        hashes *= self._ipw[: n - m + 1]
        return hashes

    def in_bytes(self, data: bytes, where: str) -> list[Hit]:
        hits, found = [], set()
        buf = np.frombuffer(data, dtype=np.uint8)
        for start in range(0, max(0, len(data) - self.m + 1), _CHUNK):
            seg = buf[start : start + _CHUNK + self.m - 1]
            hashes = self._hashes(seg)
            for i in np.nonzero(self._buckets[hashes >> np.uint64(64 - _BUCKET_BITS)])[0]:
                for index, offset in self.anchors.get(int(hashes[i]), ()):
                    blob, site, row, name = self.patterns[index]
                    begin = start + int(i) - offset
                    if (
                        begin >= 0
                        and data[begin : begin + len(blob)] == blob
                        and index not in found
                    ):
                        found.add(index)
                        hits.append(Hit(site, row, name, where))
        return hits

    def in_table(self, table: pd.DataFrame, where: str) -> list[Hit]:
        """Rows of ``table`` whose numeric values hold a row (its ``width`` values in a run)."""
        numeric = table.select_dtypes("number").to_numpy(dtype=np.float32, na_value=np.nan)
        hits = []
        if numeric.ndim != 2 or numeric.shape[1] < self.width:
            return hits
        for values in numeric:
            blob = values.astype("<f4").tobytes()
            for j in range(0, len(blob) - 4 * self.width + 1, 4):
                for site, row in self.float32.get(blob[j : j + 4 * self.width], ()):
                    hits.append(Hit(site, row, "a table row", where))
        return hits

    def in_file(self, path: Path) -> list[Hit]:
        data = path.read_bytes()
        hits = self.in_bytes(data, str(path))
        if zipfile.is_zipfile(io.BytesIO(data)):  # e.g. a torch.save file, or one at the end
            with zipfile.ZipFile(io.BytesIO(data)) as archive:  # of a sealed update
                for member in archive.namelist():
                    try:
                        unpacked = archive.read(member)
                    except Exception:  # noqa: BLE001 - a damaged member (a tampered update):
                        continue  # its bytes were searched as they are
                    hits += self.in_bytes(unpacked, f"{path}!{member}")
        if path.suffix in (".parquet", ".csv"):
            read = pd.read_parquet if path.suffix == ".parquet" else pd.read_csv
            try:
                table = read(io.BytesIO(data))
            except Exception:  # noqa: BLE001 - not a table after all: its bytes were searched
                table = None
            if table is not None:
                hits += self.in_table(table, str(path))
        return hits

    def in_folders(self, *folders: Path) -> tuple[list[Hit], int]:
        """Every hit in every file under ``folders``, and how many files were searched."""
        hits, count = [], 0
        for folder in folders:
            for path in sorted(folder.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    hits += self.in_file(path)
                    count += 1
        return hits, count
