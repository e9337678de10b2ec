"""llama.cpp's importance matrix and its file: per weight, the sum over the calibration tokens of every input
channel's squared activation and the number of tokens, which the K-quants weigh their rounding by
(in_sum2 / count per channel).

The file is what llama-imatrix writes since llama.cpp #14842: general.type = "imatrix", imatrix.datasets
(the calibration sources), imatrix.chunk_count and imatrix.chunk_size, and per weight an F32
`<tensor>.in_sum2` of one row of input channels and an F32 `<tensor>.counts`. llama-quantize --imatrix reads
it, and so does export_gguf; imatrix.py computes one from a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from ..storage.atomic import staged_file
from .errors import ExportError

SUMS, COUNTS = ".in_sum2", ".counts"


class ImatrixError(ExportError):
    """An importance matrix file that cannot be read, or does not fit the model it is used with."""


@dataclass
class ImportanceMatrix:
    """Per GGUF weight name: the sum of squared inputs per input channel and the number of tokens summed."""
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0  # the sequences the sums ran over
    chunk_size: int = 0  # the longest of them, in tokens
    file: str = ""  # the file it was read from or saved to, if any

    def importance(self, name: str) -> torch.Tensor | None:
        """The quantizer's weight per input channel of `name`, in_sum2 / count in float32 as llama-quantize
        divides them; None where the matrix has no entry (the tensor is quantized without one)."""
        if name not in self.sums:
            return None
        sums = self.sums[name].to(torch.float32)
        if self.counts[name] == 0:  # an entry that saw no token: llama.cpp weighs every channel alike
            return torch.ones_like(sums)
        return sums / torch.tensor(float(self.counts[name]), dtype=torch.float32)

    def check_fits(self, name: str, columns: int) -> None:
        if name in self.sums and self.sums[name].numel() != columns:
            raise ImatrixError(f"importance matrix entry {name} has {self.sums[name].numel()} input channels, "
                               f"the model's tensor {columns}: the matrix was computed for another model")

    def save(self, path: str | Path) -> Path:
        """Write llama.cpp's imatrix GGUF (entries in name order, as llama-imatrix sorts them)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with staged_file(target) as staging:
            writer = gguf.GGUFWriter(staging, arch="")
            # gguf-py always starts with general.architecture; llama-imatrix's files have none.
            writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
            writer.add_type("imatrix")
            writer.add_array("imatrix.datasets", list(self.datasets) or ["<unnamed>"])
            writer.add_uint32("imatrix.chunk_count", self.chunk_count)
            writer.add_uint32("imatrix.chunk_size", self.chunk_size)
            for name in sorted(self.sums):
                sums = self.sums[name].to(torch.float32).reshape(1, -1).numpy()
                writer.add_tensor(name + SUMS, sums)
                writer.add_tensor(name + COUNTS, np.array([[float(self.counts[name])]], dtype=np.float32))
            try:
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            finally:
                writer.close()
        self.file = str(target)
        return target

    @classmethod
    def load(cls, path: str | Path) -> ImportanceMatrix:
        """Read an imatrix GGUF (ours or llama-imatrix's); dense entries only (one count per weight)."""
        try:
            reader = gguf.GGUFReader(path)
        except (OSError, ValueError) as error:
            raise ImatrixError(f"{path}: not a readable GGUF file ({error})") from None
        if _string_field(reader, "general.type") != "imatrix":
            raise ImatrixError(f"{path}: not an importance matrix (general.type is not 'imatrix'); make one with "
                               "`stratos-lite imatrix` or llama-imatrix")
        tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
        matrix = cls(datasets=_strings_field(reader, "imatrix.datasets", path),
                     chunk_count=_int_field(reader, "imatrix.chunk_count", path),
                     chunk_size=_int_field(reader, "imatrix.chunk_size", path), file=str(path))
        for tensor_name, sums in tensors.items():
            if not tensor_name.endswith(SUMS):
                continue
            name = tensor_name.removesuffix(SUMS)
            counts = tensors.get(name + COUNTS)
            if counts is None or counts.size != 1:
                raise ImatrixError(f"{path}: entry {name} has {'no' if counts is None else counts.size} counts; "
                                   "only dense models' matrices (one count per weight) are supported")
            matrix.sums[name] = torch.from_numpy(sums.reshape(-1).copy())
            matrix.counts[name] = int(counts.reshape(-1)[0])
        return matrix


def _field(reader: gguf.GGUFReader, key: str, path):
    entry = reader.fields.get(key)
    if entry is None:
        raise ImatrixError(f"{path}: missing {key}, which llama.cpp's imatrix files carry")
    return entry


def _string_field(reader: gguf.GGUFReader, key: str) -> str | None:
    entry = reader.fields.get(key)
    return None if entry is None else bytes(entry.parts[entry.data[0]]).decode()


def _strings_field(reader: gguf.GGUFReader, key: str, path) -> list[str]:
    entry = _field(reader, key, path)
    return [bytes(entry.parts[index]).decode() for index in entry.data]


def _int_field(reader: gguf.GGUFReader, key: str, path) -> int:
    entry = _field(reader, key, path)
    return int(entry.parts[entry.data[0]][0])
