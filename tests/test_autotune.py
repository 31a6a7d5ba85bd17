"""backend="auto" measurement cache: choice, persistence, reuse (the timing itself is stubbed on the CPU)."""

import json
import threading

import pytest
import torch

from fused_resnet.call import ConvCall
from fused_resnet import autotune, backends, dispatch


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSED_RESNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "environment_key", lambda device: "test GPU | versions")
    monkeypatch.setattr(autotune, "_choices", {})
    times = {"slow": 2.0, "fast": 1.0, "middle": 1.5}
    calls = []

    def median_ms(run, device):
        name = run()
        calls.append(name)
        return times[name]

    monkeypatch.setattr(autotune, "_median_ms", median_ms)
    return calls


def _candidates(*names):
    return {name: (lambda name=name: name) for name in names}


def test_fastest_candidate_is_chosen_and_stored(tuner, tmp_path):
    device = torch.device("cpu")
    assert autotune.choose(device, "layer A", _candidates("slow", "fast", "middle")) == "fast"
    assert sorted(tuner) == ["fast", "middle", "slow"]
    stored = json.loads((tmp_path / "autotune.json").read_text())
    assert stored == {"test GPU | versions": {"layer A": {"choice": "fast", "rejected": {}}}}


def test_choice_is_reused_without_measuring_again_even_after_reload(tuner):
    device = torch.device("cpu")
    autotune.choose(device, "layer A", _candidates("slow", "fast"))
    tuner.clear()
    autotune.forget()  # as a new process would: read back from the file
    assert autotune.choose(device, "layer A", _candidates("slow", "fast")) == "fast"
    assert tuner == []


def test_single_candidate_or_disabled_takes_the_first(tuner, monkeypatch):
    device = torch.device("cpu")
    assert autotune.choose(device, "layer B", _candidates("slow")) == "slow"
    monkeypatch.setenv("FUSED_RESNET_AUTOTUNE", "0")
    assert autotune.choose(device, "layer C", _candidates("slow", "fast")) == "slow"
    assert tuner == []


def test_unreadable_cache_file_is_measured_again(tuner, tmp_path):
    (tmp_path / "autotune.json").write_text("{not json")
    assert autotune.choose(torch.device("cpu"), "layer D", _candidates("slow", "fast")) == "fast"


def test_concurrent_callers_measure_each_layer_once(tuner):
    device = torch.device("cpu")
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(autotune.choose(device, "layer E", _candidates("slow", "fast"))))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["fast"] * 8 and sorted(tuner) == ["fast", "slow"]


def test_auto_uses_the_tuned_backend_on_cuda(monkeypatch):
    """_select hands every serving candidate to the tuner and uses its pick."""
    seen = []

    def tune(candidates):
        seen.extend(b.NAME for b in candidates)
        return candidates[-1]

    monkeypatch.setattr(backends, "auto_order", lambda device: ("cudnn", "torch"))
    monkeypatch.setattr(backends.get("cudnn"), "unavailable_reason", lambda device: None)
    call = ConvCall.of(torch.empty(1, 1, 1, 1), torch.empty(1, 1, 1, 1))  # a CPU call every backend here serves
    chosen = dispatch._select(dispatch.CONV, "auto", call, tune)
    assert seen == ["cudnn", "torch"] and chosen.NAME == "torch"


def test_cuda_backend_measures_its_kernels_once_per_layer(tuner, monkeypatch):
    """The CUDA C++ backend times each compiled conv kernel that serves a layer (kernel launches and
    timings stubbed: this runs without a GPU) and launches the fastest from then on."""
    cuda = backends.get("cuda")
    monkeypatch.setattr(cuda, "CONV_CONFIGS", ("optimized_big", "optimized_small", "few_channels_stem"))
    # Which kernels serve a layer is the extension's rule (tests/test_cuda_kernel_choice.py): here,
    # the few-channels kernel serves inputs with at most 8 channels.
    monkeypatch.setattr(cuda, "_serving_configs", lambda call: [0, 1] + ([2] if call.x.shape[1] <= 8 else []))
    monkeypatch.setattr(cuda, "_config_choice", {})
    launched = []
    monkeypatch.setattr(cuda, "_launch", lambda out, *args: launched.append(args[-1]))
    times = {-1: 3.0, 0: 2.0, 1: 1.0, 2: 0.5}  # by config index; -1 is the C++ heuristic

    def median_ms(run, device):
        run()
        return times[launched[-1]]

    monkeypatch.setattr(autotune, "_median_ms", median_ms)

    def conv(channels):
        x, weight = torch.randn(2, channels, 5, 5), torch.randn(8, channels, 3, 3)
        out = torch.empty(2, 8, 3, 3)
        cuda.conv2d_bias_act(out, ConvCall.of(x, weight))

    conv(64)  # the few-channels kernel does not serve 64 channels
    assert launched == [-1, 0, 1, 1]
    x, weight = torch.randn(2, 64, 5, 5), torch.randn(8, 64, 3, 3)
    assert cuda.chosen_kernel(ConvCall.of(x, cuda._krsc(weight))) == "optimized_small"
    assert cuda.chosen_kernel(ConvCall.of(x, cuda._krsc(weight), relu=False)) is None  # never run
    launched.clear()
    conv(64)
    assert launched == [1]  # remembered: no measurement
    launched.clear()
    conv(3)  # the stem: every kernel serves it
    assert launched == [-1, 0, 1, 2, 2]
    choices = json.loads(autotune.cache_file().read_text())["test GPU | versions"]
    assert sorted(c["choice"] for c in choices.values()) == ["few_channels_stem", "optimized_small"]  # stored by name
    monkeypatch.setenv("FUSED_RESNET_AUTOTUNE", "0")
    monkeypatch.setattr(cuda, "_config_choice", {})
    launched.clear()
    conv(64)
    assert launched == [-1]  # not measuring: the heuristic


def test_a_candidate_that_raises_is_excluded_with_one_warning(tuner, tmp_path):
    def no_kernel_image():
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    candidates = {"broken": no_kernel_image, **_candidates("slow", "fast")}
    with pytest.warns(UserWarning, match=r"backend 'broken' excluded for layer \[layer F\]: RuntimeError: CUDA error: no kernel image"):
        assert autotune.choose(torch.device("cpu"), "layer F", candidates) == "fast"
    stored = json.loads((tmp_path / "autotune.json").read_text())["test GPU | versions"]["layer F"]
    assert stored["choice"] == "fast" and list(stored["rejected"]) == ["broken"]


def test_candidates_run_and_are_timed_on_the_layer_device(tuner, monkeypatch, current_cuda_device):
    """A layer on cuda:1 while cuda:0 is current: every run and every timing happens with cuda:1 current
    (CUDA events and launches that follow the current device would otherwise measure cuda:0)."""
    current = current_cuda_device
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    seen = []

    def median_ms(run, device):
        seen.append((run(), device, current.current))
        return len(seen)

    monkeypatch.setattr(autotune, "_median_ms", median_ms)
    layer_device = torch.device("cuda", 1)
    candidates = {name: (lambda name=name: (name, current.current)) for name in ("a", "b")}
    assert autotune.choose(layer_device, "layer G", candidates) == "a"
    assert seen == [(("a", layer_device), layer_device, layer_device), (("b", layer_device), layer_device, layer_device)]
    assert current.current == torch.device("cuda", 0)  # restored


def test_each_gpu_model_keeps_its_own_choices(tuner, monkeypatch, current_cuda_device, tmp_path):
    """Two GPUs of different models in one machine: a layer measured on each is stored under each
    one's environment, and neither choice is taken for the other."""
    monkeypatch.setattr(autotune, "environment_key", lambda device: f"GPU model {device.index}")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    faster_on = {"slow": 0, "fast": 1}  # which device each candidate wins on

    def median_ms(run, device):
        return 1.0 if faster_on[run()] == device.index else 2.0

    monkeypatch.setattr(autotune, "_median_ms", median_ms)
    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert autotune.choose(gpu0, "layer H", _candidates("slow", "fast")) == "slow"
    assert autotune.choose(gpu1, "layer H", _candidates("slow", "fast")) == "fast"
    stored = json.loads((tmp_path / "autotune.json").read_text())
    assert {env: c["layer H"]["choice"] for env, c in stored.items()} == {"GPU model 0": "slow", "GPU model 1": "fast"}
    autotune.forget()
    monkeypatch.setattr(autotune, "_median_ms", lambda run, device: pytest.fail("measured again"))
    assert autotune.choose(gpu1, "layer H", _candidates("slow", "fast")) == "fast"
    assert autotune.choose(gpu0, "layer H", _candidates("slow", "fast")) == "slow"
