"""A frozen base in 4 bits: QLoRA's NormalFloat-4 with double-quantized scales, in plain PyTorch.

    the weight, flattened, in blocks of 64      code = the NF4 level nearest to w / absmax(block)
    the blocks' absmax, less their mean,        int8 = round(s * 128 / absmax(group)), clamped to [-128, 127]
      in groups of 256
    dequantized                                 w = NF4[code] * (int8 / (128 / absmax(group)) + mean)

Half a byte per weight, plus a byte per 64 and a factor per 16,384: 0.52 bytes against bf16's 2. The levels (the
quantiles of a normal distribution, to 4 decimals), the block layout (two codes a byte, the first in the high
nibble) and every operation, done in the weight's own dtype, are those of torchao's NF4Tensor (block 64, scaler
block 256, as torchtune's QLoRA uses them), so the codes and scales equal it (tests/test_nf4.py). Two cases
torchao leaves undefined are defined here: a weight whose size is not a multiple of 64 has its last block padded
with zeros, and a group whose scales are all equal (absmax 0) stores them as their mean exactly. An all-zero block
takes code 0, as both references give it (0 / 0 is NaN, which no level is nearer to): it dequantizes to -1 times
its (near-zero) dequantized scale.

NF4Linear holds only the codes. Its forward dequantizes the weight in its dtype, multiplies and lets it go; the
backward dequantizes it again for the input's gradient (the weight is frozen, it has none), so a layer's
dequantized weight exists only while that layer computes. Its `weight` is the dequantized weight, made on each
read: what DoRA's norm and the merge read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from .lora import adapter_layers

BLOCK = 64  # weights per absmax scale
SCALE_GROUP = 256  # scales per double-quantization factor
QUANTIZE_CHUNK = 1 << 20  # weights compared against the 16 levels at once while quantizing
LEVELS = (-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
          0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0)


def nf4_levels(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(LEVELS, dtype=dtype, device=device)


def byte_values(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """(256, 2): the two levels each code byte stands for, so dequantizing is one lookup per byte."""
    levels = nf4_levels(dtype, device)
    every_byte = torch.arange(256, device=device)
    return torch.stack((levels[every_byte >> 4], levels[every_byte & 15]), dim=1)


def _block_absmax(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.abs().amax(dim=1)


def _padded_blocks(weight: torch.Tensor) -> torch.Tensor:
    """The weight flattened into rows of BLOCK values, the last padded with zeros."""
    flat = weight.reshape(-1)
    padding = -len(flat) % BLOCK
    return F.pad(flat, (0, padding)).view(-1, BLOCK) if padding else flat.view(-1, BLOCK)


def _nearest_levels(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each value's nearest level (the lowest on a tie; a NaN takes the first), as uint8, QUANTIZE_CHUNK values
    at a time: the (values x 16) distances of a whole weight would be 32 times its size."""
    flat = scaled.reshape(-1)
    codes = torch.empty(len(flat), dtype=torch.uint8, device=flat.device)
    for start in range(0, len(flat), QUANTIZE_CHUNK):
        part = flat[start:start + QUANTIZE_CHUNK, None]
        codes[start:start + QUANTIZE_CHUNK] = (part - levels).abs().min(dim=1).indices
    return codes


def _quantized_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocks' absmax scales double-quantized: (int8 codes, a factor per group of SCALE_GROUP, their mean)."""
    mean = scales.mean()
    centred = scales - mean
    padding = -len(centred) % SCALE_GROUP
    groups = F.pad(centred, (0, padding)).view(-1, SCALE_GROUP)  # the padding is 0: it never sets an absmax
    absmax = _block_absmax(groups)
    factors = torch.where(absmax > 0, 256 / (2 * absmax), torch.ones_like(absmax))
    codes = (groups * factors[:, None]).round().clamp(-128, 127).to(torch.int8)
    return codes.view(-1)[:len(scales)], factors, mean


class NF4Linear(nn.Module):
    """A frozen, bias-free linear whose weight is held as NF4 codes (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        blocks = -(-in_features * out_features // BLOCK)
        # Not in the state dict: a run never saves the base; it is quantized again from the model folder.
        self.register_buffer("codes", torch.empty(blocks * BLOCK // 2, dtype=torch.uint8, device=device), False)
        self.register_buffer("scale_codes", torch.empty(blocks, dtype=torch.int8, device=device), False)
        groups = -(-blocks // SCALE_GROUP)
        self.register_buffer("scale_factors", torch.empty(groups, dtype=dtype, device=device), False)
        self.register_buffer("scale_mean", torch.empty((), dtype=dtype, device=device), False)
        self.register_buffer("byte_values", byte_values(dtype, device), False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> NF4Linear:
        layer = cls(weight.shape[1], weight.shape[0], weight.dtype, weight.device)
        layer.quantize_(weight)
        return layer

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> None:
        """Hold `weight` (out_features, in_features), quantized where it lies, in its dtype."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"NF4Linear({self.in_features}, {self.out_features}) cannot hold a weight of shape "
                             f"{tuple(weight.shape)}")
        blocks = _padded_blocks(weight)
        scales = _block_absmax(blocks)
        codes = _nearest_levels(blocks / scales[:, None], nf4_levels(weight.dtype, weight.device))
        self.codes = codes[0::2] << 4 | codes[1::2]
        self.scale_codes, self.scale_factors, self.scale_mean = _quantized_scales(scales)
        self.byte_values = byte_values(weight.dtype, weight.device)
        self.dtype = weight.dtype

    def block_scales(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The dequantized absmax of blocks start:stop (all by default), in the weight's dtype, from only the
        scale groups that hold them."""
        stop = len(self.scale_codes) if stop is None else stop
        first, last = start // SCALE_GROUP, -(-stop // SCALE_GROUP)
        codes = self.scale_codes[first * SCALE_GROUP:last * SCALE_GROUP]
        groups = F.pad(codes, (0, -len(codes) % SCALE_GROUP)).view(-1, SCALE_GROUP)
        scales = (groups / self.scale_factors[first:last, None]).view(-1)
        offset = start - first * SCALE_GROUP
        return scales[offset:offset + stop - start].to(self.dtype) + self.scale_mean

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (out_features, in_features), made on each read."""
        return self.rows(0, self.out_features)

    def rows(self, start: int, end: int) -> torch.Tensor:
        """Rows start:end of the dequantized weight, from only the blocks that hold them."""
        first, last = start * self.in_features, min(end, self.out_features) * self.in_features
        blocks = slice(first // BLOCK, -(-last // BLOCK))
        codes = self.codes[blocks.start * BLOCK // 2:blocks.stop * BLOCK // 2]
        values = F.embedding(codes.int(), self.byte_values).view(-1, BLOCK)
        values = values * self.block_scales(blocks.start, blocks.stop)[:, None]
        offset = first - blocks.start * BLOCK
        return values.view(-1)[offset:offset + last - first].view(-1, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantizedLinear.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 in {self.dtype}"


class _DequantizedLinear(torch.autograd.Function):
    """x W^T with W dequantized in the forward and again in the backward, never kept in between."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer, ctx.input_dtype = layer, x.dtype
        return F.linear(x, layer.weight)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        weight = ctx.layer.weight
        return (gradient.to(weight.dtype) @ weight).to(ctx.input_dtype), None


def quantize_base(model: nn.Module) -> int:
    """Each adapter's frozen base linear replaced by an NF4Linear holding its weight: quantized when the weight
    has values, empty where it has none (the meta device before loading, whose weights load_weights quantizes
    as it reads them; the plan's fake tensors). Returns how many were replaced."""
    layers = list(adapter_layers(model))
    for _, layer in layers:
        weight = layer.base_layer.weight
        if weight.is_meta or isinstance(weight, FakeTensor):
            layer.base_layer = NF4Linear(weight.shape[1], weight.shape[0], weight.dtype, weight.device)
        else:
            layer.base_layer = NF4Linear.from_weight(weight.detach())
    return len(layers)


def quantized_layers(model: nn.Module) -> dict[str, NF4Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, NF4Linear)}
