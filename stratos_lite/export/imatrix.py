"""An importance matrix for the K-quants, from the task's own prompts: what llama.cpp's `llama-imatrix`
computes, in torch on the trained model.

For each weight the quantizer will see, the matrix holds the sum over the calibration tokens of every input
channel's squared activation (`<tensor>.in_sum2`) and the number of tokens (`<tensor>.counts`); the quantizer
weights a value's rounding error by its channel's mean square, in_sum2 / count. As llama-imatrix, it covers
the matrix multiplications of the layers (`blk.*`), and the output projection only when asked (its input is
the final hidden state; a model with tied embeddings has none: llama.cpp names that tensor token_embd and never
collects it); the token embedding is a lookup, not a product, and has no entry.

Which tokens count: llama-imatrix sums every token of its text, and so does a calibration text here. The
task's records run whole (prompt and completion, as training renders them), but by default only the
positions that predict the completion are summed: those are the activations the served answer comes from,
while the prompt's (a long system prompt, profile and article: 78 % of the demo's tokens) would outweigh
them. On the demo the matrix over every token made q4_k_m's next-token divergence from the model larger than
no matrix at all; over the completion positions, smaller.

The matrix and its file are imatrix_file.py's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.batch import IGNORE_INDEX
from ..data.dataset import ScoredDataset
from ..model.qwen3 import Qwen3ForCausalLM
from ..model.tokenizer import Tokenizer
from .gguf_file import LAYER_TENSORS
from .imatrix_file import ImatrixError, ImportanceMatrix

OUTPUT = "output.weight"
# The layers' matrix multiplications (their norms are not products): torch module path -> llama.cpp's name.
LAYER_PRODUCTS = {path: name for path, name in LAYER_TENSORS.items() if not name.endswith("norm")}


# collection -----------------------------------------------------------------------------------------------

def product_modules(model: Qwen3ForCausalLM, include_output: bool = False) -> dict[str, nn.Module]:
    """GGUF weight name -> the module whose input feeds that weight's product (an adapter layer's input is
    its base weight's input)."""
    modules = {f"blk.{index}.{name}.weight": layer.get_submodule(path)
               for index, layer in enumerate(model.model.layers) for path, name in LAYER_PRODUCTS.items()}
    if include_output and not model.config.tie_word_embeddings:
        modules[OUTPUT] = model.lm_head
    return modules


class _Accumulator:
    """Forward pre-hooks that add each counted position's squared inputs to its weight's sums (float64, so the
    order in which tokens arrive does not matter to the result); padding is never counted."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = dict.fromkeys(modules, 0)
        self.counted: torch.Tensor | None = None  # (batch, time) True at the positions counted in this batch

    @contextmanager
    def attached(self):
        handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in self.modules.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str):
        def add(_module, inputs):
            x = inputs[0]
            tokens = x[self.counted] if x.dim() == 3 else x  # the output projection sees only counted positions
            squares = tokens.float().square().sum(dim=0, dtype=torch.float64)
            self.sums[name] = squares if name not in self.sums else self.sums[name] + squares
            self.counts[name] += len(tokens)
        return add


@torch.no_grad()
def collect_imatrix(model: Qwen3ForCausalLM, sequences: Sequence[Sequence[int]], *, pad_id: int = 0,
                    batch_size: int = 8, include_output: bool = False, datasets: Iterable[str] = (),
                    counted: Sequence[tuple[int, int]] | None = None, progress: bool = False) -> ImportanceMatrix:
    """Run `model` (as it is: adapters active, or merged) over token `sequences` and accumulate its
    importance matrix. Sequences run a batch at a time, right-padded, each from position 0. counted: per
    sequence, the (start, end) range of positions whose inputs are summed (default: every position)."""
    if not sequences:
        raise ImatrixError("no calibration sequences: give the task's JSONL or a --calibration text")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    accumulator = _Accumulator(product_modules(model, include_output))
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths pad little
    ranges = counted if counted is not None else [(0, len(sequence)) for sequence in sequences]
    try:
        with accumulator.attached():
            for start in tqdm(range(0, len(order), batch_size), desc="imatrix", disable=not progress):
                chosen = order[start:start + batch_size]
                ids, counted_now = _padded([sequences[i] for i in chosen], [ranges[i] for i in chosen], pad_id,
                                           device)
                accumulator.counted = counted_now
                if include_output:
                    model(ids, logits_at=counted_now.flatten().nonzero()[:, 0])
                else:
                    model.hidden_states(ids)
    finally:
        model.train(was_training)
    return ImportanceMatrix(accumulator.sums, {name: accumulator.counts[name] for name in accumulator.sums},
                            list(datasets), len(sequences), max(len(s) for s in sequences))


def _padded(batch: Sequence[Sequence[int]], ranges: Sequence[tuple[int, int]], pad_id: int,
            device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch right-padded, and a mask True at the positions to count (never at padding)."""
    longest = max(len(s) for s in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    counted = torch.zeros((len(batch), longest), dtype=torch.bool)
    for row, (sequence, (first, end)) in enumerate(zip(batch, ranges, strict=True)):
        ids[row, :len(sequence)] = torch.as_tensor(list(sequence), dtype=torch.long)
        counted[row, first:min(end, len(sequence))] = True
    return ids.to(device), counted.to(device)


def text_chunks(token_ids: Sequence[int], chunk: int) -> list[list[int]]:
    """A calibration text's tokens cut into whole chunks of `chunk` tokens, as llama-imatrix cuts its input
    (the remainder shorter than a chunk is left out, as there)."""
    if chunk < 1:
        raise ImatrixError(f"the calibration chunk must be at least 1 token, got {chunk}")
    whole = len(token_ids) // chunk
    if whole == 0:
        raise ImatrixError(f"the calibration text has {len(token_ids)} tokens, fewer than one chunk of {chunk}")
    return [list(token_ids[i * chunk:(i + 1) * chunk]) for i in range(whole)]


POSITIONS = ("completion", "all")


def calibration_sequences(tokenizer: Tokenizer, data: Sequence[str | Path] = (), calibration: str | Path | None = None,
                          *, max_len: int = 1024, chunk: int = 512, limit: int = 0,
                          positions: str = "completion") -> tuple[list[list[int]], list[tuple[int, int]]]:
    """The token sequences a matrix is computed over, and per sequence the range of positions counted: each
    record of the task's JSONL files rendered as training renders it (the prompt the model will serve and its
    completion, shortened to max_len as in training), counted at the positions that predict the completion
    (positions "completion") or at every one ("all"); or, with `calibration`, a plain text file cut into
    chunks of `chunk` tokens as llama-imatrix cuts its input, every position counted.
    limit: at most this many sequences, spread evenly over all of them (0: every one)."""
    if positions not in POSITIONS:
        raise ImatrixError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    if calibration is not None:
        try:
            text = Path(calibration).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ImatrixError(f"{calibration}: cannot read the calibration text ({error})") from None
        chunks = _spread(text_chunks(tokenizer.encode(text), chunk), limit)
        return chunks, [(0, len(c)) for c in chunks]
    examples = _spread([e for path in data for e in ScoredDataset.from_jsonl(path, tokenizer, max_len).examples],
                       limit)
    if not examples:
        raise ImatrixError("no calibration data: give the task's JSONL (train or eval) or a calibration text")
    sequences = [example.input_ids.tolist() for example in examples]
    if positions == "all":
        return sequences, [(0, len(s)) for s in sequences]
    # The first labelled token is the completion's first; the position before it predicts it, and the last
    # position (the completion's end token) predicts nothing.
    firsts = [int((example.labels != IGNORE_INDEX).nonzero()[0, 0]) for example in examples]
    return sequences, [(first - 1, len(s) - 1) for first, s in zip(firsts, sequences, strict=True)]


def _spread(items: list, limit: int) -> list:
    """`limit` of the items at even steps through them (all when limit is 0 or not below their number)."""
    if not limit or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def compute_imatrix(model: Qwen3ForCausalLM, tokenizer: Tokenizer, data: Sequence[str | Path] = (),
                    calibration: str | Path | None = None, *, max_len: int = 1024, chunk: int = 512, limit: int = 0,
                    positions: str = "completion", batch_size: int = 8, include_output: bool = False,
                    progress: bool = False) -> ImportanceMatrix:
    """The importance matrix of `model` over the task's records (`data`; the positions that predict each
    completion, or with positions "all" every one) or a calibration text (at most `limit` sequences of them,
    spread evenly; 0: all)."""
    sequences, counted = calibration_sequences(tokenizer, data, calibration, max_len=max_len, chunk=chunk,
                                               limit=limit, positions=positions)
    sources = [str(calibration)] if calibration is not None else [str(path) for path in data]
    return collect_imatrix(model, sequences, pad_id=tokenizer.pad_id, batch_size=batch_size,
                           include_output=include_output, datasets=sources, counted=counted, progress=progress)
