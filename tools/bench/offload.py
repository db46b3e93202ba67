"""The cloud-only baseline's server, as Sedna-style offload systems do it: every frame arrives as
its JPEG, the cloud decodes it and runs the whole model (here tierlite's end -> edge -> cloud
chain, the same "cloud model" the accuracy figures use) and answers the node.

Message: <prefix>/<node>/frame = 4-byte frame id (uint32 LE) + JPEG bytes. Answer: a
tierlite.wire ANSWER on <prefix>/<node>/answer. Benchmark use only:
    python -m tierlite.tools.bench.offload --port P --bundle DIR
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import threading

FRAME_ID = "<I"
SUFFIX = "frame"


def offload_topic(prefix: str, node: str) -> str:
    return f"{prefix}/{node}/{SUFFIX}"


class OffloadWorker:
    def __init__(self, bundle_dir: str, port: int, prefix: str = "tierlite", runtime: str = "litert"):
        from tierlite.bundle import Bundle
        from tierlite.config import BrokerConfig
        from tierlite.mqtt import MqttClient
        from tierlite.segment import Segment

        self.bundle = Bundle.load(bundle_dir)
        self.size = tuple(self.bundle.input_shape[1:3])
        self.chain = [Segment(self.bundle, t, runtime=runtime) for t in ("end", "edge", "cloud")
                      if t in self.bundle.segments]
        self.prefix = prefix
        self.dropped = 0
        self.mqtt = MqttClient(BrokerConfig(host="127.0.0.1", port=port), f"tierlite-bench-offload-{os.getpid()}",
                               on_connect=self._ready)
        self.mqtt.subscribe(f"{prefix}/+/{SUFFIX}", self.on_frame)

    def _ready(self) -> None:
        self.mqtt.publish(f"{self.prefix}/_bench/offload/status", json.dumps({"pid": os.getpid()}), 1, retain=True)

    def on_frame(self, topic: str, payload: bytes) -> None:
        from tierlite.data import decode_image
        from tierlite.errors import TierliteError
        from tierlite.policy import decide
        from tierlite.topics import node_of, node_topic as make_topic
        from tierlite.wire import encode_answer

        try:
            node = node_of(topic, self.prefix)
            (frame_id,) = struct.unpack_from(FRAME_ID, payload)
            x = decode_image(bytes(payload[4:]), self.size)[None]
        except (TierliteError, struct.error):
            self.dropped += 1
            return
        for seg in self.chain:
            out = seg.run(x)
            x = out.feature
        _, label, conf, entropy = decide(out.logits, None)
        self.mqtt.publish(make_topic(self.prefix, node, "answer"),
                          encode_answer("cloud", frame_id, label, conf, entropy, self.bundle.name, self.bundle.version))


def main(argv: list[str] | None = None) -> int:
    from tierlite.service import run_until_signal, wait_for_stop

    p = argparse.ArgumentParser(prog="tierlite-bench-offload")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--prefix", default="tierlite")
    p.add_argument("--runtime", default="litert")
    args = p.parse_args(argv)
    worker = OffloadWorker(args.bundle, args.port, args.prefix, args.runtime)
    stop = threading.Event()

    def serve() -> int:
        worker.mqtt.start()
        wait_for_stop(stop)
        worker.mqtt.stop(timeout=0.5)
        return 0

    return run_until_signal(serve, stop.set)


if __name__ == "__main__":
    sys.exit(main())
