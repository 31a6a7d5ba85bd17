"""What the tests share: eager PyTorch's conv + bias (+ residual) (+ ReLU), the float64 reference of the
parity rule (fused_resnet.parity), and the assertion of that rule."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fused_resnet.parity import parity


def eager_conv(x, weight, bias=None, residual=None, stride=1, padding=0, dilation=1, groups=1, relu=True,
               *, scale=None, shift=None, dtype=None):
    """act(F.conv2d(x, weight, bias) + residual) by unfused eager PyTorch, every tensor cast to `dtype` first
    (default: as they are). With `scale` and `shift`, conv2d_preact's (y, z): y without the activation and
    z = relu(y * scale + shift) per channel."""

    def cast(t):
        return None if t is None else t.detach().to(dtype or x.dtype)

    y = F.conv2d(cast(x), cast(weight), cast(bias), stride, padding, dilation, groups)
    if residual is not None:
        y = y + cast(residual)
    if scale is not None:
        return y, torch.relu(y * cast(scale)[:, None, None] + cast(shift)[:, None, None])
    return y.relu() if relu else y


def reference_conv(*args, **kwargs):
    """eager_conv in float64: the reference of the parity rule."""
    return eager_conv(*args, dtype=torch.float64, **kwargs)


def assert_parity(out, *args, **kwargs):
    """`out`, our result for eager_conv(*args, **kwargs), passes the parity rule: its error against float64 is
    at most twice eager PyTorch's in out's dtype, plus a floor."""
    result = parity(out, eager_conv(*args, dtype=out.dtype, **kwargs), reference_conv(*args, **kwargs))
    assert result.ok, str(result)
