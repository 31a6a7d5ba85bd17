"""backend="auto" measurement cache: choice, persistence, reuse (the timing itself is stubbed on the CPU)."""

import json
import threading

import pytest
import torch

from fused_resnet import autotune, backends


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSED_RESNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "environment_key", lambda device: "test GPU | versions")
    monkeypatch.setattr(autotune, "_choices", None)
    times = {"slow": 2.0, "fast": 1.0, "middle": 1.5}
    calls = []

    def median_ms(run):
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
    assert stored == {"test GPU | versions": {"layer A": "fast"}}


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
    chosen = backends._select("auto", torch.device("cpu"), "convolution", lambda b: None, tune)
    assert seen == ["cudnn", "torch"] and chosen.NAME == "torch"
