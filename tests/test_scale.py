"""predict on Ray Data and the Ray Serve deployment, on a real local Ray cluster of 2 CPUs.

Ray Data must write the rows the single-process job writes; Serve must answer concurrent HTTP
requests on 127.0.0.1 with eager's top-k, and lose none of a bounded load test. CI installs ray
(Makefile: SCALE_DEPS); without it these tests skip, saying so.
"""

import base64
import concurrent.futures
import json
import socket
import statistics
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import fused_resnet.__main__ as cli
from fused_resnet.predict import load_model

from predict_images import ARCH, CROP, GOOD, assert_rows_match_eager, eager_outputs, read_csv, topk, write_images

ray = pytest.importorskip("ray", reason='Ray Data and Serve need ray: pip install "fused_resnet[ray]" (CI installs it)')
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision are deprecated")

K = 5
# The load test: requests, client threads, and the most it may take (it stops by itself either way).
REQUESTS, CLIENTS, LOAD_TEST_SECONDS = 200, 8, 120


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def logits(images):
    return eager_outputs(images)


def test_ray_data_writes_the_single_process_rows(cluster, images, logits, tmp_path, capsys):
    """The command line with --ray (2 actors on the 2 CPUs) against the same command without."""
    common = ["predict", str(images), "--arch", ARCH, "--crop-size", str(CROP), "--batch", "3", "--no-progress"]
    assert cli.main([*common, "--out", str(tmp_path / "single.csv")]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "ray.csv"), "--ray", "--concurrency", "2"]) == 0
    assert "Ray Data, 2 actors of 1 CPU): 7 predicted, 2 failed" in capsys.readouterr().out
    single, on_ray = read_csv(tmp_path / "single.csv"), read_csv(tmp_path / "ray.csv")
    assert_rows_match_eager(on_ray, images, K, logits)
    assert [row["path"] for row in on_ray] == [row["path"] for row in single]
    for ours, theirs in zip(on_ray, single):
        assert ours["error"] == theirs["error"]
        if not ours["error"]:
            (classes, probs), (expected, expected_probs) = topk(ours, K), topk(theirs, K)
            assert classes == expected and np.allclose(probs, expected_probs, rtol=1e-5, atol=1e-7)


def test_predict_dataset_takes_a_dataset_of_decoded_images(cluster, images, logits):
    """A user's own Dataset, from ray.data.read_images (which decodes with PIL: only the good files)."""
    from fused_resnet.scale import predict_dataset

    good = [str(images / name) for name, _, _ in GOOD if not name.endswith(".webp")]  # read_images lists no WebP
    ds = ray.data.read_images(good, include_paths=True, mode="RGB")
    rows = predict_dataset(ds, load_model(ARCH, crop_size=CROP), topk=K, batch_size=4).take_all()
    assert sorted(row["path"] for row in rows) == sorted(good)
    for row in rows:
        expected = logits[row["path"]].topk(K).indices.tolist()
        classes = [row[f"class_{i}"] for i in range(1, K + 1)]
        if row["path"].endswith(".png"):  # lossless: PIL decodes the pixels torchvision decodes
            assert classes == expected, row["path"]
        else:  # PIL's JPEG decoder may round a pixel otherwise than torchvision's
            assert classes[0] == expected[0], row["path"]


def test_a_fused_model_pickled_into_a_ray_worker_runs_fused_there(cluster):
    """Unpickling imports fused_resnet in the worker, which registers its ops; oneDNN packs the weights
    there anew (its cache is never pickled) and computes what it computed here."""
    import fused_resnet as fr
    from fused_resnet.architectures import build
    from fused_resnet.parity import relative_error

    fused = fr.fuse(build(ARCH, torch.Generator().manual_seed(1)))
    x = torch.randn(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = fused(x)

    @ray.remote
    def run_in_a_worker(model, x):
        import fused_resnet as fr
        from fused_resnet import dispatch
        from fused_resnet.backends import onednn

        with torch.no_grad(), dispatch.record_serving() as served:
            y = model(x)
        packed = sum(bool(onednn._packed.copies(m.weight)) for m in model.modules() if isinstance(m, fr.FusedConv2d))
        return y, served.count("onednn"), packed

    y, calls, packed = ray.get(run_in_a_worker.remote(fused, x))
    assert calls == sum(isinstance(m, fr.FusedConv2d) for m in fused.modules()) and packed == calls
    assert relative_error(y, expected) <= 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes, content_type: str = "application/octet-stream", timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def served(cluster):
    """The deployment on 127.0.0.1: (its URL, its handle)."""
    from ray import serve

    from fused_resnet.serve import application

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    handle = serve.run(
        application(load_model(ARCH, crop_size=CROP), topk=K, max_batch_size=8, batch_wait_ms=20), name="test", route_prefix="/"
    )
    yield f"http://127.0.0.1:{port}/", handle
    serve.delete("test")


def _check_topk(answer: dict, expected: torch.Tensor, categories: list[str]) -> None:
    top = expected.topk(K)
    assert [entry["class"] for entry in answer["topk"]] == top.indices.tolist()
    assert [entry["name"] for entry in answer["topk"]] == [categories[i] for i in top.indices]
    probs = [entry["prob"] for entry in answer["topk"]]
    assert np.allclose(probs, expected.softmax(0)[top.indices].numpy(), rtol=1e-5, atol=1e-7)


def test_serve_answers_concurrent_requests_with_eager_topk(served, images, logits):
    url, _ = served
    categories = load_model(ARCH).categories
    good = [images / name for name, _, _ in GOOD]
    with concurrent.futures.ThreadPoolExecutor(len(good)) as pool:
        answers = list(pool.map(lambda path: _post(url, path.read_bytes()), good))
    for path, (status, answer) in zip(good, answers):
        assert status == 200, answer
        _check_topk(answer, logits[str(path)], categories)
    # The same image as base64 JSON.
    status, answer = _post(url, json.dumps({"image": base64.b64encode(good[0].read_bytes()).decode()}).encode(), "application/json")
    assert status == 200
    _check_topk(answer, logits[str(good[0])], categories)


@pytest.mark.parametrize(
    "body, content_type, message",
    [
        ("broken.jpg", "image/jpeg", "cannot decode: Image is incomplete or truncated"),
        ("text.jpg", "application/octet-stream", "cannot decode: Unsupported image file"),
        (b"", "application/octet-stream", "empty file"),
        (b'{"picture": "AAAA"}', "application/json", 'a JSON body must be {"image": "<base64 of an image file>"}'),
        (b'{"image": "not base64!"}', "application/json", 'a JSON body must be {"image": "<base64 of an image file>"}'),
    ],
)
def test_serve_answers_a_bad_image_with_400_and_why(served, images, body, content_type, message):
    url, _ = served
    data = (images / body).read_bytes() if isinstance(body, str) else body
    status, answer = _post(url, data, content_type)
    assert status == 400 and message in answer["error"], answer


def test_serve_load_test_loses_no_request(served, images, logits):
    """REQUESTS requests from CLIENTS threads, each with a timeout: every one answered, and right."""
    url, handle = served
    good = [images / name for name, _, _ in GOOD]
    bodies = [path.read_bytes() for path in good]
    expected = [logits[str(path)].argmax().item() for path in good]
    deadline = time.monotonic() + LOAD_TEST_SECONDS

    def one(i: int):
        if time.monotonic() > deadline:
            return i, None, 0.0
        start = time.perf_counter()
        status, answer = _post(url, bodies[i % len(bodies)], timeout=30)
        return i, (status, answer), time.perf_counter() - start

    handle.stats.remote().result()  # batch sizes from here on
    batches_before = len(handle.stats.remote().result()["batch_sizes"])
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(one, range(REQUESTS)))
    elapsed = time.perf_counter() - start
    answered = [(i, r, t) for i, r, t in results if r is not None]
    assert len(answered) == REQUESTS, f"{REQUESTS - len(answered)} requests not sent within {LOAD_TEST_SECONDS} s"
    for i, (status, answer), _ in answered:
        assert status == 200, answer
        assert answer["topk"][0]["class"] == expected[i % len(bodies)]
    latencies = sorted(t for _, _, t in answered)
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
    batches = handle.stats.remote().result()["batch_sizes"][batches_before:]
    assert sum(batches) == REQUESTS
    assert max(batches) > 1, "dynamic batching never gathered two requests"
    print(
        f"\nserve load test: {REQUESTS} requests from {CLIENTS} threads, 0 lost; latency p50 {p50 * 1e3:.0f} ms, "
        f"p99 {p99 * 1e3:.0f} ms; {REQUESTS / elapsed:.1f} requests/s; batches {len(batches)}, mean size "
        f"{statistics.mean(batches):.1f}, largest {max(batches)}"
    )


def test_serve_command_refuses_a_bad_port(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--arch", ARCH, "--port", "70000"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "python -m fused_resnet serve: error: --port 70000 is not a port number\n"
