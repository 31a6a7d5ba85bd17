"""The derivatives of the fused ops, shared by every op that computes the same function (the ops of
fused_resnet.ops, and the CUDA extension's functional ops).

    conv2d_bias_act: y = act(conv2d(x, weight) + bias + residual)
    conv2d_preact:   y = conv2d(x, weight) + bias + residual,  z = relu(y * scale + shift)
    add_relu:        y = relu(x + y')
"""

from __future__ import annotations

import torch


def conv_setup_context(ctx, x, weight, bias, residual, stride, padding, dilation, groups, relu, output) -> None:
    ctx.save_for_backward(x, weight, output if relu else None)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None


def conv_backward(ctx, grad) -> tuple:
    """The gradients of (x, weight, bias, residual)."""
    x, weight, output = ctx.saved_tensors
    if output is not None:
        grad = grad * (output > 0)
    return conv_backward_from(ctx, grad, x, weight)


def conv_backward_from(ctx, grad, x, weight) -> tuple:
    """The gradients of x, weight, bias and residual, given the gradient of conv2d(x, weight) + bias + residual."""
    stride, padding, dilation, groups = ctx.conv_args
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    grad_x = grad_w = None
    if need_x or need_w:
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [need_x, need_w, False]
        )
    grad_b = grad.sum((0, 2, 3)) if ctx.has_bias and need_b else None
    grad_r = grad if ctx.has_residual and need_r else None
    return grad_x, grad_w, grad_b, grad_r


def preact_setup_context(ctx, x, weight, bias, residual, scale, stride, padding, dilation, groups, output) -> None:
    ctx.save_for_backward(x, weight, scale, *output)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None


def preact_backward(ctx, grad_y, grad_z) -> tuple:
    """The gradients of (x, weight, bias, residual, scale, shift)."""
    x, weight, scale, y, z = ctx.saved_tensors
    # Through z = relu(y * scale + shift): where z > 0 its gradient reaches y (times scale), scale and shift.
    grad_affine = grad_z * (z > 0)
    need_scale, need_shift = ctx.needs_input_grad[4:6]
    grad_scale = (grad_affine * y).sum((0, 2, 3)) if need_scale else None
    grad_shift = grad_affine.sum((0, 2, 3)) if need_shift else None
    grad = grad_y + grad_affine * scale[:, None, None]
    return (*conv_backward_from(ctx, grad, x, weight), grad_scale, grad_shift)


def add_relu_setup_context(ctx, output) -> None:
    ctx.save_for_backward(output)


def add_relu_backward(ctx, grad) -> tuple:
    """The gradients of (x, y)."""
    (output,) = ctx.saved_tensors
    grad = grad * (output > 0)
    return grad, grad
