"""bench/peers.py and bench/profile.sh's summariser, without servers: the peers prepare images as
tuneserve does, the load generator reads what servers send, the bad-input mix is counted right, and
the profile puts a stack in the category of its leaf-most known frame."""
from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import peers  # noqa: E402
from models.artifact.manifest import Preprocessing  # noqa: E402
from models.serving.preprocess import prepare  # noqa: E402


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = load("bench/peers/common.py", "peers_common")
profile = load("bench/peers/profile_server.py", "peers_profile_server")


def photo_jpeg(width: int, height: int) -> bytes:
    """A smooth photo-like JPEG (gradients and a disc), so resampling differences stay small."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, ((x - width / 2) ** 2 + (y - height / 2) ** 2 < (height / 3) ** 2) * 200], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_peers_prepare_images_exactly_as_tuneserve_does_or_the_plain_way():
    spec = {"size": 224, "resize": 256, "interpolation": "bilinear", "mean": [127.0] * 3, "std": [128.0] * 3}
    for width, height in ((480, 319), (608, 404), (300, 500), (1100, 800)):  # the last decodes at 1/2 scale
        data = photo_jpeg(width, height)
        ours = prepare(data, Preprocessing(**spec)).astype(int)
        same = common.prepare(Image.open(io.BytesIO(data)), spec).astype(int)
        plain = common.prepare(Image.open(io.BytesIO(data)), spec, same_as_tuneserve=False).astype(int)
        assert ours.shape == same.shape == plain.shape == (224, 224, 3)
        assert np.array_equal(ours, same)
        assert np.abs(ours - plain).mean() < 2  # full decode and resize: close, not equal


def test_multipart_request_is_complete_http():
    request = peers.multipart(3000, "/classify", b"\xff\xd8jpeg", {"top_k": "5"})
    head, body = request.split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /classify HTTP/1.1\r\n")
    assert int(head.split(b"Content-Length: ")[1]) == len(body)
    assert b'name="top_k"\r\n\r\n5\r\n' in body and b'name="image"; filename="p.jpg"' in body and b"\xff\xd8jpeg" in body


def test_read_body_reads_content_length_and_chunked_answers():
    async def read(answer: bytes) -> tuple[bool, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(answer + b"NEXT")
        head = await reader.readuntil(b"\r\n\r\n")
        closes = await peers.read_body(reader, head)
        return closes, await reader.readexactly(4)

    plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
    chunked = b"HTTP/1.1 500 Error\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    assert asyncio.run(read(plain)) == (False, b"NEXT")
    assert asyncio.run(read(chunked)) == (True, b"NEXT")


def test_send_all_sends_every_request_once_over_keep_alive_and_reconnects_after_close():
    seen: list[bytes] = []

    async def serve(reader, writer) -> None:
        # answers two requests per connection, then closes it: the client must reconnect
        for n in range(2):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
            seen.append(head.split(b"\r\n")[0])
            status = b"400 Bad" if b"/bad" in head else b"200 OK"
            close = b"Connection: close\r\n" if n == 1 else b""
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n" + close + b"\r\nok")
            await writer.drain()
        writer.close()

    async def run():
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        requests = [peers.multipart(port, "/bad" if i % 3 == 0 else "/good", b"x") for i in range(10)]
        async with server:
            return await peers.send_all(port, requests, clients=3)

    results, seconds = asyncio.run(run())
    assert [status for status, _ in results] == [400 if i % 3 == 0 else 200 for i in range(10)]
    assert len(seen) == 10 and seconds > 0


def test_the_bad_input_mix_and_its_tally():
    jpegs = [photo_jpeg(64, 48), photo_jpeg(80, 60)]
    mix = peers.mixed_images(jpegs, 40)
    kinds = [kind for kind, _ in mix]
    assert kinds.count("good") == 32 and len(set(kinds) - {"good"}) == 4
    assert all(data in jpegs for kind, data in mix if kind == "good")
    answers = [(200, 1.0) if kind == "good" else (500, 1.0) for kind in kinds]
    answers[0] = (500, 1.0)  # a good image failed with its batch
    answers[1] = (0, 1.0)    # a good image whose connection failed
    tally = peers.tally(kinds, answers)
    assert tally["good"] == 32 and tally["bad"] == 8 and tally["status_5xx"] == 9
    assert tally["good_lost"] == 2 and tally["good_lost_by_status"] == {"5xx": 1, "connection failed": 1}
    assert tally["statuses_by_input"]["empty file"] == {"500": 2}


def test_table_reports_failed_and_measured_servers():
    measured = {"name": "litserve", "version": "0.2.19", "load": {"throughput": 120.0, "p50_ms": 200.0, "p99_ms": 400.0,
                                                               "server_cpu_ms_per_request": 15.0},
                "bad_input": {"status_5xx": 120, "good_lost": 20, "good": 400, "answers_after": 200,
                              "statuses_by_input": {"good": {"200": 380, "500": 20}, "empty file": {"500": 25}}}}
    text = peers.table([measured, {"name": "ray-serve", "version": "2.60.0", "error": "not ready"}])
    assert "| litserve 0.2.19 | 120.0 | 200.0 | 400.0 | 15.0 | 120 | 20 of 400 | 25× 500 | 200 |" in text
    assert "| ray-serve 2.60.0 | failed: not ready |" in text


def test_server_pids_finds_a_process_tree_and_its_cpu():
    assert peers.server_pids(999_999_999) == []
    assert os.getpid() in peers.server_pids(os.getpid()) and peers.server_cpu_s(os.getpid()) > 0


ASGI = ("Server.run (uvicorn/server.py:86);run_asgi (uvicorn/protocols/http/httptools_impl.py:401);"
        "ClientIdMiddleware.__call__ (service/loop/plane.py:224);Router.__call__ (starlette/routing.py:715)")


def test_profile_puts_a_stack_in_its_leaf_most_known_frame():
    stack = ASGI.split(";")
    assert profile.categorise(stack + ["parse (python_multipart/multipart.py:1100)"]) == "multipart"
    assert profile.categorise(stack + ["isfuture (asyncio/base_futures.py:21)"]) == "other"  # framework, not the loop
    assert profile.categorise(stack[:3] + ["ClientIdMiddleware.__call__ (service/loop/plane.py:210)"]) == "production loop"
    assert profile.categorise(["_worker (concurrent/futures/thread.py:83)", "run_batch (service/batching.py:59)",
                               "Session.run (onnxruntime/capi/onnxruntime_inference_collection.py:395)"]) == "ONNX Runtime"
    assert profile.categorise(["Batcher._run (service/batching.py:144)", "submit (concurrent/futures/thread.py:175)"]) == "batcher hand-off"
    assert profile.categorise(["data_received (uvicorn/protocols/http/httptools_impl.py:200)"]) == "HTTP parsing"
    assert profile.waiting(["Thread.run (threading.py:982)", "Condition.wait (threading.py:327)"])


def test_profile_summary_turns_busy_shares_into_cpu_per_request_and_draws_them():
    text = (f"worker-1;{ASGI};parse (python_multipart/multipart.py:1100) 10\n"
            "worker-2;run_batch (service/batching.py:59);Session.run (onnxruntime/capi/x.py:1) 30\n"
            "worker-2;Thread.run (threading.py:982);Condition.wait (threading.py:327) 60\n")
    stacks = profile.read_collapsed(text)
    summary = profile.summarise(stacks, cpu_s=2.0, requests=100)  # 20 ms of CPU per request
    shares = {row["category"]: row for row in summary["categories"]}
    assert summary["samples"] == 100 and summary["busy_samples"] == 40
    assert abs(shares["ONNX Runtime"]["cpu_ms_per_request"] - 15.0) < 1e-9
    assert abs(shares["multipart"]["cpu_ms_per_request"] - 5.0) < 1e-9
    assert summary["top"][0]["category"] == "ONNX Runtime"
    assert "| ONNX Runtime | 75.0% | 15.00 |" in profile.markdown(summary)
    drawing = ElementTree.fromstring(profile.svg(stacks))
    titles = [t.text for t in drawing.iter("{http://www.w3.org/2000/svg}title")]
    assert any(t.startswith("Session.run") for t in titles) and any(t.startswith("all (100 samples") for t in titles)
