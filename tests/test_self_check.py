

@pytest.mark.parametrize(
    "groups, dilation, channels_last", [(1, 1, False), (2, 2, True), (3, 1, True)], ids=["plain", "grouped-dilated", "grouped"]
)
def test_a_right_backend_passes_its_check(generator, groups, dilation, channels_last):
    """The Triton kernels (in the interpreter, on the CPU) pass the check: it does not reject right
    results, on odd shapes, grouped and dilated convs, in either layout."""
    if reason := backends.get("triton").unavailable_reason(torch.device("cpu")):
        pytest.skip(reason)
    x = torch.randn(1, 6, 7, 5, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, 6 // groups, 3, 3, generator=generator)
    residual = torch.randn(1, 6, 7, 5, generator=generator)
    with exclusions() as excluded:
        out = fr.ops.conv2d_bias_act(
            x, weight, torch.randn(6, generator=generator), residual,
            padding=dilation, dilation=dilation, groups=groups, backend=backends.verified("triton"),
        )  # fmt: skip
    assert excluded == {}
    torch.testing.assert_close(out, (F.conv2d(x, weight, None, 1, dilation, dilation, groups) + residual).relu() + 0 * out, rtol=0, atol=float("inf"))
