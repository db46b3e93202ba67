"""The model-server peer of `tierlite bench offload` (docs/BENCHMARKS.md "Model-server peer"): the
full model it serves answers as tierlite's own chain does, and the benchmark runs both systems on
the same digits frames through the CLI (real Mosquitto, edge and cloud workers, a real Ray Serve)."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from tierlite.tools.bench.offload import FullModel
from tierlite.tools.cli import main

from runtime_support import offline_chain


def test_full_model_answers_as_the_chain_and_keeps_a_batch_past_a_bad_frame(small_bundle_dir, digits_dir):
    paths = sorted((digits_dir / "test").rglob("*.jpg"))[:6]
    expected = offline_chain(small_bundle_dir, paths)["cloud"].argmax(axis=1)
    jpegs = [p.read_bytes() for p in paths]
    answers = FullModel(str(small_bundle_dir)).classify(jpegs[:3] + [b"not a jpeg"] + jpegs[3:])
    assert answers[3] == {"error": "bad frame: not a decodable image"}
    good = answers[:3] + answers[4:]
    np.testing.assert_array_equal([a["label"] for a in good], expected)  # batched int8 == frame by frame
    assert all(0.0 < a["confidence"] <= 1.0 for a in good)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray Serve not installed (pip install -e '.[bench]')")
def test_bench_offload_measures_tierlite_and_ray_serve_on_the_same_frames(small_bundle_dir, digits_dir, tmp_path,
                                                                         capsys):
    out = tmp_path / "bench"
    code = main(["bench", "offload", "--bundle", str(small_bundle_dir), "--data", str(digits_dir / "test"),
                 "--frames", "24", "--nodes", "4", "--rates", "20", "--step-seconds", "1.5", "--quiet",
                 "--out", str(out)])
    if code != 0 and "ray did not start" in capsys.readouterr().err:
        # Ray's raylet gives its dashboard agent ~15 s to start; a CPU-starved machine misses it
        pytest.skip("Ray could not start a local cluster on this (overloaded) machine")
    assert code == 0
    doc = json.loads((out / "results.json").read_text())["offload"]["results"]
    tierlite, peer = doc["systems"]
    assert (tierlite["kind"], peer["kind"]) == ("tierlite", "peer")
    assert any(name.startswith("ray::ServeReplica") for name in peer["processes"])  # the replica's CPU is counted
    for system in (tierlite, peer):
        (step,) = system["steps"]
        assert step["sent"] == 30 and step["answered"] == 30 and step["lost"] == 0 and step["rejected"] == 0
        assert step["latency"]["n"] == 30 and step["server_cpu_ms_per_message"] > 0
    # the peer's request is the JPEG plus an HTTP header; tierlite's message is the feature tensor
    assert doc["jpeg_bytes_mean"] < peer["steps"][0]["wire_bytes_up"] < doc["jpeg_bytes_mean"] + 200
    assert 0 < doc["escalations"] <= doc["frames"] == 24
    assert "Ray Serve (every frame)" in (out / "offload.md").read_text()


@pytest.mark.skipif(importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("starlette") is None,
                    reason="uvicorn/starlette not installed (they come with '.[bench]')")
def test_http_load_answers_every_frame_over_100_keep_alive_connections(small_bundle_dir, digits_dir):
    """The generator half of the 100-node Ray fault (docs/BENCHMARKS.md): 100 keep-alive connections
    to a real HTTP server (uvicorn + starlette, the server stack under Serve's proxy) serving the
    full model; each connection carries 1-2 requests, as 100 nodes at a low rate do."""
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from tierlite.edge.broker import port_open
    from tierlite.tools.bench.offload import PEER_ROUTE, HttpLoad
    from tierlite.tools.stack import free_port, wait_until

    model = FullModel(str(small_bundle_dir), max_batch_size=1)

    async def classify(request):
        return JSONResponse(model.classify([await request.body()])[0])

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route(PEER_ROUTE, classify, methods=["POST"])]),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 30, "uvicorn")
        jpegs = [p.read_bytes() for p in sorted((digits_dir / "test").rglob("*.jpg"))[:20]]
        load = HttpLoad("127.0.0.1", port, jpegs, nodes=100)
        result, wire = load.step(60, 2.5, drain=30.0)  # the drain ends as soon as all are answered
    finally:
        server.should_exit = True
        thread.join(10)
    assert (result.sent, result.answered, result.lost, result.send_failures) == (150, 150, 0, 0)
    assert load.last_open == {"written_unanswered": 0, "queued_unsent": 0, "connections_open_at_drain_end": 0}
    assert wire["request"] > wire["response"] > 0
