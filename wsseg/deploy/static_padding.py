"""Constant TF-style 'same' padding for ONNX export.

timm's TensorFlow-ported models (`tf_efficientnet_*`, `tf_mobilenetv3_*`, ...) pad their strided
convolutions at run time from the input size (`Conv2dSame`). Exported, each becomes a Shape/Pad
subgraph that ONNX Runtime can neither fold into the convolution nor run in its blocked layout, so
every one costs a copy and two layout reorders. When each such convolution sees an input whose size
is a multiple of its stride, which holds for every layer of a U-Net fed multiples of 32, the
padding is a constant: `k_eff - stride` in total, the extra pixel at the end, as TensorFlow does.
The exported Conv then carries it in its (asymmetric) `pads` attribute and the graph has no Pad.
Measured on the Kvasir-SEG U-Net in docs/experiments.md.
"""

from __future__ import annotations

import copy
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F


def same_padding(kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> Tuple[int, ...]:
    """ONNX `pads` (begin..., end...) of TF 'same' padding for inputs divisible by the stride."""
    begin, end = [], []
    for k, s, d in zip(kernel_size, stride, dilation):
        total = max((k - 1) * d + 1 - s, 0)
        begin.append(total // 2)
        end.append(total - total // 2)
    return tuple(begin + end)


class _PaddedConv2d(torch.autograd.Function):
    """F.pad + conv2d in PyTorch; one ONNX Conv with asymmetric pads when exported."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, dilation, groups, pads):
        top, left, bottom, right = pads
        return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride, 0, dilation, groups)

    @staticmethod
    def symbolic(g, x, weight, bias, stride, dilation, groups, pads):
        inputs = [x, weight] if bias is None else [x, weight, bias]
        kernel = weight.type().sizes()[-2:]
        return g.op("Conv", *inputs, kernel_shape_i=list(kernel), strides_i=list(stride),
                    dilations_i=list(dilation), group_i=groups, pads_i=list(pads))


class StaticSamePadConv2d(torch.nn.Conv2d):
    """A `Conv2dSame` whose padding assumes input sizes divisible by its stride (inference/export only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Traced sizes are symbolic; the runtime checks multiples of 32 on the exported model instead.
        if not torch.jit.is_tracing() and (x.shape[-2] % self.stride[0] or x.shape[-1] % self.stride[1]):
            raise ValueError(f"static same padding needs input sizes divisible by the stride {tuple(self.stride)}, "
                             f"got {tuple(x.shape[-2:])}")
        pads = same_padding(self.kernel_size, self.stride, self.dilation)
        return _PaddedConv2d.apply(x, self.weight, self.bias, tuple(self.stride), tuple(self.dilation),
                                   self.groups, pads)


def with_static_same_padding(module: torch.nn.Module) -> Tuple[torch.nn.Module, int]:
    """A copy of `module` with every timm `Conv2dSame` replaced; returns it and the number replaced.

    The original is left alone (it may still be trained or fed other sizes)."""
    from timm.layers import Conv2dSame

    if not any(isinstance(m, Conv2dSame) for m in module.modules()):
        return module, 0
    module = copy.deepcopy(module)
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv2dSame):
                static = StaticSamePadConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                             0, child.dilation, child.groups, child.bias is not None)
                static.load_state_dict(child.state_dict())
                setattr(parent, name, static.to(child.weight.device).train(child.training))
                replaced += 1
    return module, replaced
