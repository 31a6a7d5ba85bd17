"""Triton's autotuner keeps one tile per key: the conv kernel's key must change with everything that
changes its compiled code, so that a tile tuned for one epilogue is never reused for another.

PREACT (a second store, y's fp32 values kept live for it), HAS_BIAS, HAS_RESIDUAL and RELU are
constexprs: each value is another kernel, with other registers and memory traffic. Nothing is
compiled or launched here: meta tensors, and Triton's own autotuner with its launch stubbed.
"""

import importlib
import inspect
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")


def conv_module():
    return importlib.import_module("fused_resnet.backends.triton.conv")


def layer_arguments(bias=True, residual=True, relu=True, preact=False):
    """The kernel's arguments and constexprs for one 3x3 fp16 layer with the given epilogue."""
    conv = conv_module()

    def channels_last(*shape):
        return torch.empty(*shape, dtype=torch.float16, device="meta").contiguous(memory_format=torch.channels_last)

    x, out = channels_last(8, 64, 28, 28), channels_last(8, 64, 28, 28)
    weight = torch.empty(64, 3, 3, 64, dtype=torch.float16, device="meta")
    vector = torch.empty(64, dtype=torch.float16, device="meta")
    second = conv.Preact(vector, vector, channels_last(8, 64, 28, 28)) if preact else None
    return conv.kernel_arguments(out, x, weight, vector if bias else None, channels_last(8, 64, 28, 28) if residual else None,
                                 (1, 1), (1, 1), (1, 1), 1, relu and not preact, "tf32", second)


EPILOGUES = {
    "bias_residual_relu": dict(),
    "no_bias": dict(bias=False),
    "no_residual": dict(residual=False),
    "no_relu": dict(relu=False),
    "preact": dict(preact=True),
}


def test_the_key_holds_every_constexpr_but_the_tile():
    conv = conv_module()
    parameters = inspect.signature(conv._conv_kernel.fn).parameters
    constexprs = {name for name, p in parameters.items() if "constexpr" in str(p.annotation)}
    keys = set(conv._conv_kernel_tuned.keys)
    assert {"PREACT", "HAS_BIAS", "HAS_RESIDUAL", "RELU"} <= keys
    assert constexprs - keys == {"BLOCK_M", "BLOCK_N", "BLOCK_K"}


def test_each_epilogue_of_a_layer_has_its_own_key():
    conv = conv_module()
    keys = {name: conv._tuning_key(conv.named_arguments(*layer_arguments(**kw))) for name, kw in EPILOGUES.items()}
    assert len(set(keys.values())) == len(EPILOGUES), keys


def test_a_tile_tuned_without_preact_is_not_reused_with_it(monkeypatch):
    """Triton's autotuner, holding the tile it chose for the plain epilogue, tunes the PREACT call anew
    (here: pruning leaves one config, which it takes without timing) instead of reusing that tile."""
    conv = conv_module()
    tuner = conv._conv_kernel_tuned
    plain_args, plain_constexprs = layer_arguments()
    preact_args, preact_constexprs = layer_arguments(preact=True)
    configs = conv.shrunk_configs(*conv.problem_size(conv.named_arguments(plain_args, plain_constexprs)))
    tuned_plain, only_fit_with_preact = configs[0], configs[-1]
    monkeypatch.setattr(tuner, "cache", {conv._tuning_key(conv.named_arguments(plain_args, plain_constexprs)): tuned_plain})
    pruned = []
    monkeypatch.setattr(tuner, "prune_configs", lambda kwargs: pruned.append(kwargs["PREACT"]) or [only_fit_with_preact])
    monkeypatch.setattr(tuner, "_bench", lambda *args, **kwargs: pytest.fail("the autotuner timed configs"))
    ran = []
    monkeypatch.setattr(tuner, "fn", SimpleNamespace(run=lambda *args, **kwargs: ran.append(kwargs)))

    tuner.run(*plain_args, grid=(1,), warmup=False, **plain_constexprs)
    tuner.run(*preact_args, grid=(1,), warmup=False, **preact_constexprs)

    def tile(kwargs):
        return {k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}

    assert pruned == [True]  # the plain call found its tile; the PREACT call pruned for itself
    assert tile(ran[0]) == tuned_plain.kwargs and tile(ran[1]) == only_fit_with_preact.kwargs
    assert tuner.cache[conv._tuning_key(conv.named_arguments(preact_args, preact_constexprs))] is only_fit_with_preact
