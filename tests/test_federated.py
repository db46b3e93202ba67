"""Co-training on Flower (docs/COTRAINING.md): the math (fast), then real processes on loopback:
`tierlite federate server` (SuperLink + ServerApp) and `tierlite federate site` (SuperNode +
ClientApp) over HTTP without TLS (`--insecure`), training on the digits frames."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tierlite.federated import (ModelMismatch, check_arrays, cloud_average, dumps, is_personal, loads, payload_bytes,
                                proximal_term, region_averages, server_step, split_personal, weighted_average)

pytestmark = pytest.mark.timeout(900)


# -- math (numpy only) -------------------------------------------------------------------------
def test_weighted_average_is_fedavg():
    a = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([[0.0]], np.float32)}
    b = {"w": np.array([3.0, 6.0], np.float32), "b": np.array([[4.0]], np.float32)}
    avg = weighted_average([a, b], [100, 300])
    np.testing.assert_allclose(avg["w"], [2.5, 5.0])
    np.testing.assert_allclose(avg["b"], [[3.0]])
    assert avg["w"].dtype == np.float32 and list(avg) == ["w", "b"]
    with pytest.raises(ValueError):
        weighted_average([a, b], [0, 0])


def test_hierarchical_average_regions_then_cloud():
    models = [{"w": np.array([v], np.float32)} for v in (1.0, 3.0, 10.0)]
    regional = region_averages(models, [1, 3, 4], ["north", "north", "south"])
    assert {r: (float(m["w"][0]), n) for r, (m, n) in regional.items()} == {"north": (2.5, 4.0), "south": (10.0, 4.0)}
    # the regions of one round, weighted by their examples: FedAvg of all the sites
    assert float(cloud_average(regional)["w"][0]) == pytest.approx(float(weighted_average(models, [1, 3, 4])["w"][0]))
    with pytest.raises(ValueError):
        region_averages(models, [1, 3], ["north", "north", "south"])


def test_model_mismatch_is_one_line():
    spec = {"end_stem_conv/kernel": (3, 3, 3, 8), "end_logits/bias": (10,)}
    with pytest.raises(ModelMismatch) as e:
        check_arrays(spec, {"end_stem_conv/kernel": np.zeros((3, 3, 3, 4)), "end_logits/bias": np.zeros(10)}, "site b")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("site b: model does not match")
    assert "(3, 3, 3, 4)" in msg and "(3, 3, 3, 8)" in msg
    with pytest.raises(ModelMismatch, match="missing 1 array"):
        check_arrays(spec, {"end_stem_conv/kernel": np.zeros((3, 3, 3, 8))})


def test_personal_heads_and_serialisation():
    w = {"end_logits/kernel": np.ones((4, 10), np.float32), "edge_b0_conv1/kernel": np.ones((3, 3, 2, 2), np.float32),
         "cloud_hidden/bias": np.zeros(5, np.float32), "cloud_logits/bias": np.zeros(10, np.float32)}
    shared, personal = split_personal(w, ["end", "cloud"])
    assert set(personal) == {"end_logits/kernel", "cloud_hidden/bias", "cloud_logits/bias"}
    assert set(shared) == {"edge_b0_conv1/kernel"}
    assert not is_personal("end_logits/kernel", ["edge"])
    back = loads(dumps(w))
    assert list(back) == list(w) and all(np.array_equal(back[k], w[k]) for k in w)
    assert payload_bytes(w) == sum(v.nbytes for v in w.values())
    assert proximal_term({"x": np.array([1.0, 3.0])}, {"x": np.array([0.0, 1.0])}, 0.5) == pytest.approx(1.25)


def test_server_momentum_and_one_schedule_across_rounds():
    from tierlite.converters.fedtrain import federation_lr

    cur = {"c/kernel": np.array([1.0], np.float32), "c_bn/moving_mean": np.array([0.0], np.float32)}
    avg = {"c/kernel": np.array([2.0], np.float32), "c_bn/moving_mean": np.array([4.0], np.float32)}
    same, vel = server_step(cur, avg, None)  # lr 1, momentum 0: plain FedAvg
    assert vel is None and same["c/kernel"][0] == 2.0
    new, vel = server_step(cur, avg, {"c/kernel": np.array([0.5], np.float32)}, lr=1.0, momentum=0.9)
    assert new["c/kernel"][0] == pytest.approx(1.0 + 0.9 * 0.5 + 1.0)  # v = 0.9 v + delta
    assert new["c_bn/moving_mean"][0] == 4.0  # statistics: averaged, never extrapolated
    # 3 rounds of 10 local steps: one warm-up + cosine over 30 steps, not three restarts
    lrs = [federation_lr(0.1, 0.15, r, 3, s, 10) for r in (1, 2, 3) for s in range(10)]
    peak = int(np.argmax(lrs))
    assert max(lrs) == pytest.approx(0.1, rel=0.02) and 3 <= peak <= 5
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:])) and lrs[-1] < 0.002
    # a site with 4x the steps per round sits at the same point of the schedule at a round's start
    assert federation_lr(0.1, 0.15, 2, 3, 0, 40) == pytest.approx(federation_lr(0.1, 0.15, 2, 3, 0, 10))


def test_fedprox_term_keeps_local_weights_near_the_global_model(digits_dir):
    from tierlite.converters import (build_federated_model, load_folder_cached, local_train, model_weights,
                                     set_model_weights)
    from tierlite.converters.fedtrain import _variables

    frames = load_folder_cached(digits_dir / "train", 32, limit=128, seed=0)
    model, arch, tc = build_federated_model("small", 10, 0)
    start = model_weights(model)
    drift = {}
    for mu in (0.0, 10.0):
        set_model_weights(model, start)
        local_train(model, frames.images, frames.labels, tc, epochs=1, lr=0.05, proximal_mu=mu, seed=1)
        now = model_weights(model)
        ids = {id(v) for v in model.trainable_variables}
        trainable = {name for name, v in _variables(model) if id(v) in ids}
        drift[mu] = sum(float(np.sum((now[k] - start[k]) ** 2)) for k in now if k in trainable)
    assert 0 < drift[10.0] < drift[0.0]


def test_local_steps_and_batchnorm_statistics_recomputed_on_held_out_frames(digits_dir):
    import keras

    from tierlite.converters import (build_federated_model, load_folder_cached, local_train, model_weights,
                                     recompute_batchnorm)
    from tierlite.federated import is_batchnorm

    frames = load_folder_cached(digits_dir / "train", 32, limit=96, seed=0)
    model, arch, tc = build_federated_model("small", 10, 0)
    # 5 steps of batch 64 over 96 frames: one step per epoch, so five permutations
    res = local_train(model, frames.images, frames.labels, tc, lr=0.05, seed=1, steps=5, schedule=(2, 3))
    assert res["steps"] == 5 and res["lr"][0] > res["lr"][1] > 0  # round 2 of 3: past the peak, decaying
    before = model_weights(model)
    held_out = load_folder_cached(digits_dir / "test", 32, limit=64, seed=0).images
    recompute_batchnorm(model, held_out)
    after = model_weights(model)
    assert all(np.array_equal(after[k], before[k]) for k in after if not is_batchnorm(k) or k.endswith(("gamma", "beta")))
    # the first BatchNorm's mean is now the mean of its input on the held-out frames
    end = model.get_layer("end")  # the camera's segment, a sub-model fed the pixels
    stem = keras.Model(end.inputs, end.get_layer("end_stem_conv").output)
    expected = np.asarray(stem(held_out.astype(np.float32), training=True)).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(after["end_stem_bn/moving_mean"], expected, rtol=1e-3, atol=1e-5)
    assert not np.allclose(after["end_stem_bn/moving_mean"], before["end_stem_bn/moving_mean"])
    assert end.get_layer("end_stem_bn").momentum == pytest.approx(0.9)  # restored for training


# -- real Flower processes on loopback ---------------------------------------------------------
pytest.importorskip("flwr")


def test_strategy_refuses_a_reply_of_another_shape_and_averages_the_rest():
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from tierlite.cloud.federated.strategy import TierliteFedAvg, from_record, to_record

    lines: list[str] = []
    strategy = TierliteFedAvg({"w": (2,), "b": (1,)}, say=lines.append)

    def reply(node, name, w, b, n):  # what the strategy reads of a Flower reply
        content = RecordDict({"arrays": to_record({"w": np.array(w, np.float32), "b": np.array(b, np.float32)}),
                              "metrics": MetricRecord({"num-examples": n, "loss": 1.0}),
                              "site": ConfigRecord({"name": name})})
        return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False)

    agg, metrics = strategy.aggregate_train(1, [reply(1, "a", [1, 2], [0], 1), reply(2, "b", [3, 6], [4], 3),
                                                reply(3, "c", [1, 2, 3], [0], 5)])
    out = from_record(agg)
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    np.testing.assert_allclose(out["b"], [3.0])
    assert metrics["clients"] == 2 and metrics["examples"] == 4
    assert lines[0] == ("round 1: site c (node 3) refused: model does not match the federation's: "
                        "'w' has shape (3,), the federation's (2,)")
    assert strategy.rounds[0]["refused"] == [lines[0]] and strategy.rounds[0]["clients"] == 2


def test_hierfavg_sends_each_region_its_own_model_until_the_cloud_round():
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from tierlite.cloud.federated.strategy import TierliteHierFAVG, from_record, to_record

    lines: list[str] = []
    strategy = TierliteHierFAVG({"w": (1,)}, cloud_every=2, num_rounds=3, say=lines.append)

    def reply(node, name, region, w, n):
        content = RecordDict({"arrays": to_record({"w": np.array([w], np.float32)}),
                              "metrics": MetricRecord({"num-examples": n}),
                              "site": ConfigRecord({"name": name, "region": region})})
        return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False)

    def sent(record):  # what each node is sent next (training and evaluation messages: arrays_for)
        return {n: float(from_record(strategy.arrays_for(n, record))["w"][0]) for n in (1, 2, 3, 4)}

    initial = to_record({"w": np.array([0.0], np.float32)})
    assert sent(initial) == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0}  # round 1: nobody's region known yet
    agg, metrics = strategy.aggregate_train(1, [reply(1, "a", "north", 1.0, 1), reply(2, "b", "north", 3.0, 3),
                                                reply(3, "c", "south", 10.0, 4)])
    assert agg is None and metrics["clients"] == 3  # not a cloud round: the global model stays
    assert strategy.rounds[0]["cloud"] is False
    assert strategy.rounds[0]["regions"] == {"north": {"sites": ["a", "b"], "examples": 4.0},
                                             "south": {"sites": ["c"], "examples": 4.0}}
    # north's sites get north's average, south's its own; node 4 (never answered) the global model
    assert sent(initial) == {1: 2.5, 2: 2.5, 3: 10.0, 4: 0.0}
    # round 2 (cloud_every 2): only c answers; north counts with its round-1 model
    agg, _ = strategy.aggregate_train(2, [reply(3, "c", "south", 12.0, 4)])
    assert strategy.rounds[1]["cloud"] is True
    assert float(from_record(agg)["w"][0]) == pytest.approx((4 * 2.5 + 4 * 12.0) / 8)
    assert sent(agg) == {n: pytest.approx(7.25) for n in (1, 2, 3, 4)}  # every region starts from it
    assert strategy.is_cloud_round(3)  # the last round always ends in the cloud
    assert lines[0].endswith("north (a, b; 4 frames), south (c; 4 frames); next cloud round 2"), lines


def _start(args: list[str], log: Path, prefix: tuple | list = ()) -> subprocess.Popen:
    """prefix: e.g. `ip netns exec NS` (it execs the command: same process, same group)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log, "wb") as out:  # own process group: a site is killed with its ClientApp
        return subprocess.Popen([*prefix, sys.executable, "-m", "tierlite", *args], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def _site(tmp: Path, data: Path, name: str, link_port: int, *extra: str, ca: Path | None = None,
          link_host: str = "127.0.0.1", prefix: tuple | list = ()) -> subprocess.Popen:
    """A site; with `ca`, over TLS to a SuperLink whose certificate that CA signed."""
    from tierlite.tools.stack import free_port

    security = ["--root-certificates", str(ca)] if ca else ["--insecure"]
    return _start(["federate", "site", str(data), "--superlink", f"{link_host}:{link_port}", "--name", name,
                   "--workdir", str(tmp / f"site-{name}"), "--port", str(free_port()), *security, *extra],
                  tmp / f"site-{name}.log", prefix)


@contextlib.contextmanager
def _two_hosts():
    """Two network namespaces joined by a veth link (tools.bench.partition.Namespaces), or None
    where they cannot be made (not root, no iproute2, a container without the capability)."""
    from tierlite.tools.bench.partition import Namespaces

    ns = None
    if os.geteuid() == 0:
        try:
            ns = Namespaces().__enter__()
        except OSError as e:
            print(f"network namespaces unavailable ({e}): on loopback only")
    try:
        yield ns
    finally:
        if ns is not None:
            ns.__exit__(None, None, None)


def _superlink_certificates(tmp: Path, *addresses: str) -> dict[str, Path]:
    """A fleet CA (tierlite provision's) and the SuperLink's server certificate for 127.0.0.1 (and
    `addresses`)."""
    from tierlite.edge.provision import _pem_cert, _pem_key, issue, make_ca

    ca_cert, ca_key = make_ca("federation test CA")
    cert, key = issue(ca_cert, ca_key, "superlink", ["127.0.0.1", "localhost", *addresses])
    files = {"ca": tmp / "ca.crt", "cert": tmp / "superlink.crt", "key": tmp / "superlink.key"}
    files["ca"].write_bytes(_pem_cert(ca_cert))
    files["cert"].write_bytes(_pem_cert(cert))
    files["key"].write_bytes(_pem_key(key))
    return files


@pytest.fixture(scope="module")
def site_folders(digits_dir, tmp_path_factory):
    from tierlite.tools.federate import split_sites

    # 3 IID sites of ~150 frames each (small: this runs on a shared 2-core CPU)
    return split_sites(digits_dir / "train", tmp_path_factory.mktemp("sites"), 3, None, seed=0, limit=450)


def _run_server(tmp: Path, port: int, *args: str, tls: dict[str, Path] | None = None,
                prefix: tuple | list = ()) -> subprocess.Popen:
    security = (["--certfile", str(tls["cert"]), "--keyfile", str(tls["key"]), "--ca-certfile", str(tls["ca"])]
                if tls else ["--insecure"])
    return _start(["federate", "server", str(tmp / "out"), *security, "--port", str(port), "--no-evaluate",
                   "--local-epochs", "1", *args], tmp / "server.log", prefix)


def _run_federation(tmp: Path, sites: dict[str, tuple], *server_args: str, timeout: float = 800,
                    tls: dict[str, Path] | None = None, hosts=None) -> str:
    """A server and its sites (name -> (data folder, *site args)) until the server ends; its log.
    tls: over TLS with these certificates (`_superlink_certificates`), else --insecure.
    hosts: a tierlite.tools.bench.partition.Namespaces: the cloud in one network namespace
    (`--host 0.0.0.0`), the sites in the other, reaching it over the veth link (two machines)."""
    from tierlite.tools.bench.partition import GW_ADDR
    from tierlite.tools.stack import free_port

    port = free_port()
    if hosts is not None:
        server_args += ("--host", "0.0.0.0")
    server = _run_server(tmp, port, *server_args, tls=tls, prefix=hosts.prefix("gw") if hosts else ())
    procs = [_site(tmp, folder, name, port, *extra, ca=tls["ca"] if tls else None,
                   link_host=GW_ADDR if hosts else "127.0.0.1", prefix=hosts.prefix("node") if hosts else ())
             for name, (folder, *extra) in sites.items()]
    try:
        rc = server.wait(timeout)
    finally:
        for p in (*procs, server):
            _kill(p)
    text = (tmp / "server.log").read_text(errors="replace")
    assert rc == 0, text[-3000:]
    return text


def test_two_sites_two_rounds_aggregate_is_the_weighted_average_and_exports(tmp_path, site_folders, digits_dir):
    from tierlite.bundle import Bundle
    from tierlite.data import load_image_folder
    from tierlite.segment import Segment

    out_text = _run_federation(tmp_path, {"a": (site_folders[0],), "b": (site_folders[1],)},
                               "--sites", "2", "--min-sites", "2", "--rounds", "2",
                               "--calib-dir", str(digits_dir / "test"), "--export", "--personal", "end")
    assert re.search(r"round 2: 2 site\(s\)", out_text)

    import json
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["clients"] for r in report["rounds"]] == [2, 2]
    initial = loads((tmp_path / "out" / "initial.npz").read_bytes())
    for r in report["rounds"]:  # only weights travel: the whole model each way, measured
        assert r["bytes_down_per_site"] >= payload_bytes(initial)
        assert all(s["bytes_up"] >= payload_bytes(initial) for s in r["sites"])
    last = {s["site"]: s["examples"] for s in report["rounds"][-1]["sites"]}
    glob = loads((tmp_path / "out" / "global.npz").read_bytes())
    a = loads((tmp_path / "site-a" / "site-model.npz").read_bytes())  # what site a sent in round 2
    b = loads((tmp_path / "site-b" / "site-model.npz").read_bytes())
    na, nb = float(last["a"]), float(last["b"])
    assert set(glob) == set(a) == set(b) == set(initial)
    for k in glob:  # computed independently of tierlite.federated
        expect = (na * a[k].astype(np.float64) + nb * b[k].astype(np.float64)) / (na + nb)
        np.testing.assert_allclose(glob[k], expect, rtol=1e-5, atol=1e-6, err_msg=k)
    assert any(not np.allclose(glob[k], a[k]) for k in glob)
    assert any(not np.allclose(glob[k], b[k]) for k in glob)
    assert any(not np.allclose(glob[k], initial[k]) for k in glob)

    # personalised camera exit (--personal end): each site keeps the head it trained, across rounds
    assert [[s["own-heads"] for s in r["sites"]] for r in report["rounds"]] == [[0.0, 0.0], [1.0, 1.0]]
    heads = [k for k in glob if k.startswith(("end_logits/", "end_hidden/"))]
    assert heads and all(is_personal(k, ["end"]) for k in heads)
    for site in (a, b):
        assert any(not np.allclose(site[k], glob[k]) for k in heads)  # differs from the global head
    kept_a = loads((tmp_path / "site-a" / "personal.npz").read_bytes())
    assert sorted(kept_a) == sorted(heads)
    assert all(np.array_equal(kept_a[k], a[k]) for k in heads)  # what a trained in round 2 is what it keeps
    # one learning-rate schedule across the rounds (the preset's peak 0.1, warm-up 0.15): round 2
    # goes on from where round 1 stopped instead of restarting
    from tierlite.converters.fedtrain import federation_lr
    for r in report["rounds"]:
        for s in r["sites"]:
            steps = int(s["local-steps"])
            assert s["lr-first"] == pytest.approx(federation_lr(0.1, 0.15, r["round"], 2, 0, steps), rel=1e-5)
            assert s["lr-last"] == pytest.approx(federation_lr(0.1, 0.15, r["round"], 2, steps - 1, steps), rel=1e-5)
    firsts = [{s["site"]: s for s in r["sites"]}["a"]["lr-first"] for r in report["rounds"]]
    assert firsts[0] != firsts[1]

    # the aggregated model, exported through the converters, is served by the runtime
    bundle = Bundle.load(tmp_path / "out" / "bundle")
    assert bundle.manifest["training"]["federated"] and bundle.manifest["training"]["sites"] == ["a", "b"]
    assert bundle.manifest["training"]["init_from"] is None  # this federation started from scratch
    test = load_image_folder(digits_dir / "test", (32, 32), limit=8)
    end, edge, cloud = (Segment(bundle, t) for t in ("end", "edge", "cloud"))
    for img in test.images:
        o1 = end.run(img[None])
        o2 = edge.run(o1.feature)
        o3 = cloud.run(o2.feature)
        assert o3.logits.shape == (10,) and np.isfinite(o3.logits).all()
    assert (tmp_path / "out" / "report.png").is_file()

    # site a's personalised bundle (the global body + the camera head a kept), for site a's nodes only
    from tierlite.cloud.rollout import check_site
    from tierlite.errors import ConfigError

    (tmp_path / "personal-a.npz").write_bytes(dumps({**glob, **kept_a}))
    export = _start(["federate", "export", str(tmp_path / "out"), "--calib-dir", str(digits_dir / "test"),
                     "--weights", str(tmp_path / "personal-a.npz"), "--site", "a", "--bundle",
                     str(tmp_path / "bundle-a"), "--version", "2"], tmp_path / "export-a.log")
    assert export.wait(600) == 0, (tmp_path / "export-a.log").read_text()[-3000:]
    mine = Bundle.load(tmp_path / "bundle-a")
    assert mine.manifest["training"]["personalised_for"] == "a" and mine.name == bundle.name
    assert mine.segment_path("end").read_bytes() != bundle.segment_path("end").read_bytes()
    check_site(mine, "a")
    with pytest.raises(ConfigError, match="personalised for site a: publish it with --site a"):
        check_site(mine, None)


def test_hierarchical_regions_average_every_round_and_the_cloud_every_second(tmp_path, site_folders):
    """HierFAVG with real processes: sites a and b in region north, c alone in south, the cloud
    every 2 rounds (2 rounds). Round 2 starts from each region's average of round 1 (not FedAvg's
    one model for all), and round 2 ends in the cloud: the example-weighted average of everything."""
    import json

    def history(site: str, rnd: int, what: str) -> dict:  # what the site received/sent (its rounds/)
        return loads((tmp_path / f"site-{site}" / "rounds" / f"round-{rnd}-{what}.npz").read_bytes())

    def average(models: list[dict], weights: list[float]) -> dict:  # independent of tierlite.federated
        w = np.asarray(weights, np.float64)
        return {k: sum(wi * m[k].astype(np.float64) for wi, m in zip(w, models)) / w.sum() for k in models[0]}

    def close(x: dict, y: dict) -> bool:
        return all(np.allclose(x[k], y[k], rtol=1e-5, atol=1e-6) for k in x)

    text = _run_federation(tmp_path, {"a": (site_folders[0], "--region", "north"),
                                      "b": (site_folders[1], "--region", "north"),
                                      "c": (site_folders[2], "--region", "south")},
                           "--sites", "3", "--min-sites", "3", "--rounds", "2", "--cloud-every", "2",
                           "--classes", ",".join(str(i) for i in range(10)))
    assert "round 1: regions north (a, b;" in text and "round 2: cloud average of 2 region(s)" in text, text[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(r["clients"], r["cloud"]) for r in report["rounds"]] == [(3, False), (3, True)]
    assert {r: v["sites"] for r, v in report["rounds"][0]["regions"].items()} == {"north": ["a", "b"], "south": ["c"]}
    n = [{s["site"]: float(s["examples"]) for s in r["sites"]} for r in report["rounds"]]
    initial = loads((tmp_path / "out" / "initial.npz").read_bytes())
    assert all(close(history(x, 1, "received"), initial) for x in "abc")
    sent1 = {x: history(x, 1, "sent") for x in "abc"}
    north = average([sent1["a"], sent1["b"]], [n[0]["a"], n[0]["b"]])
    for x in "ab":  # round 2 of north's sites starts from north's average of round 1
        assert close(history(x, 2, "received"), north), x
    assert close(history("c", 2, "received"), sent1["c"])  # south is c alone: its own model
    fedavg = average([sent1[x] for x in "abc"], [n[0][x] for x in "abc"])  # what flat FedAvg would have sent
    assert not close(north, fedavg) and not close(sent1["c"], fedavg)
    # the cloud round: regions weighted by their examples = every site weighted by its own
    sent2 = {x: history(x, 2, "sent") for x in "abc"}
    glob = loads((tmp_path / "out" / "global.npz").read_bytes())
    assert close(glob, average([sent2[x] for x in "abc"], [n[1][x] for x in "abc"]))
    assert all(not close(glob, sent2[x]) for x in "abc")


def test_dead_site_and_wrong_model_do_not_stop_training_over_tls(tmp_path, site_folders):
    from tierlite.tools.stack import free_port

    tls = _superlink_certificates(tmp_path)  # this federation runs over TLS (the other test: --insecure)
    port = free_port()
    server = _run_server(tmp_path, port, "--sites", "3", "--min-sites", "1", "--rounds", "2",
                         # a round ends when the live sites answered and the dead one is reported
                         # unavailable; the timeout only bounds a site still busy (a loaded machine:
                         # at load 20, site a's ClientApp needed more than 60 s for its one step)
                         "--round-timeout", "240", "--classes", ",".join(str(i) for i in range(10)), tls=tls)
    good = _site(tmp_path, site_folders[0], "a", port, ca=tls["ca"])
    wrong = _site(tmp_path, site_folders[1], "b", port, "--set", "boundary=4", ca=tls["ca"])  # another model
    doomed = _site(tmp_path, site_folders[2], "c", port, ca=tls["ca"])
    try:
        # kill site c (SuperNode + its ClientApp) once its ClientApp is training round 1
        deadline = time.monotonic() + 300
        while "Start `flwr-clientapp` process" not in (tmp_path / "site-c.log").read_text(errors="replace"):
            assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        time.sleep(3)
        _kill(doomed)
        rc = server.wait(600)
    finally:
        for p in (good, wrong, doomed, server):
            _kill(p)
    text = (tmp_path / "server.log").read_text(errors="replace")
    assert rc == 0, text[-3000:]
    import json
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["clients"] for r in report["rounds"]] == [1, 1]
    assert all([s["site"] for s in r["sites"]] == ["a"] for r in report["rounds"])
    refused = [line for r in report["rounds"] for line in r["refused"] if "site b" in line]
    assert refused, report
    assert all("\n" not in line for line in refused)
    assert re.search(r"site b: model does not match the federation's: '[^']+' has shape \([^)]*\), "
                     r"the federation's \([^)]*\)", refused[0]), refused[0]
    assert (tmp_path / "out" / "global.npz").is_file()
    # the SuperLink served over TLS (the sites had only --root-certificates, no --insecure)
    assert "running on https://127.0.0.1" in (tmp_path / "out" / "superlink.log").read_text(errors="replace")


def test_site_key_files_are_checked_before_anything_starts(tmp_path):
    """SuperNode authentication's key files: generated, and every bad one (or TLS missing) refused
    in one line before a process starts."""
    from tierlite.cloud.federated.server import run_federation
    from tierlite.edge.federated import run_site
    from tierlite.errors import ConfigError
    from tierlite.federated import SiteKeyError, check_site_key, generate_site_key, site_public_keys

    key, pub = generate_site_key(tmp_path / "keys", "a")
    assert key.stat().st_mode & 0o777 == 0o600 and pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert check_site_key(key) == key and site_public_keys(tmp_path / "keys") == {"a": pub}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.pub").write_text(pub.read_text())  # a's key under another name
    (tmp_path / "junk.key").write_text("not a key\n")
    (tmp_path / "ed").mkdir()  # an SSH key, but not on a NIST curve (Flower refuses it)
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "ed" / "c.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")
    for call, expected in [
            (lambda: generate_site_key(tmp_path / "keys", "a"), "a.key: already exists; not overwritten"),
            (lambda: check_site_key(tmp_path / "none.key"), "none.key: no such site key file"),
            (lambda: check_site_key(tmp_path / "junk.key"), "junk.key: not an OpenSSH EC private key"),
            (lambda: check_site_key(pub), "a.pub: not an OpenSSH EC private key"),
            (lambda: site_public_keys(tmp_path / "nowhere"), "nowhere: no such folder of site public keys"),
            (lambda: site_public_keys(tmp_path / "ed"), "c.pub: not an OpenSSH EC public key on a NIST curve"),
            (lambda: site_public_keys(tmp_path / "empty-dir"), "empty-dir: no site public keys"),
    ]:
        with pytest.raises(SiteKeyError) as e:
            call()
        assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
    (tmp_path / "other" / "a.pub").write_text(pub.read_text())
    with pytest.raises(SiteKeyError, match=r"b.pub: the same key as a.pub; each site needs its own"):
        site_public_keys(tmp_path / "other")
    with pytest.raises(ConfigError, match="--site-keys needs TLS"):
        run_federation(tmp_path / "out", classes=["0", "1"], insecure=True, site_keys=tmp_path / "keys")
    with pytest.raises(ConfigError, match="--key needs TLS"):
        run_site("127.0.0.1:1", tmp_path, "a", tmp_path / "w", 0, insecure=True, key=key)
    assert not (tmp_path / "out").exists() and not (tmp_path / "w").exists()


def test_only_sites_with_a_registered_key_join(tmp_path, site_folders):
    """SuperNode authentication over TLS: the SuperLink knows site a's public key only; a site
    with another key (never given to the cloud) is refused and never contributes. As root, the
    cloud and the sites are two hosts (network namespaces joined by a veth link): the SuperLink
    listens on 0.0.0.0 and the sites reach its Fleet API across the link, as from another machine."""
    import json
    import shutil

    from tierlite.federated import generate_site_key
    from tierlite.tools.bench.partition import GW_ADDR

    a_key, a_pub = generate_site_key(tmp_path / "site-a-key", "a")  # each site makes its own pair
    rogue_key, _ = generate_site_key(tmp_path / "rogue-key", "rogue")
    (tmp_path / "cloud-keys").mkdir()
    shutil.copy(a_pub, tmp_path / "cloud-keys")  # the cloud holds a's public key only
    with _two_hosts() as hosts:
        text = _run_federation(tmp_path, {"a": (site_folders[0], "--key", str(a_key)),
                                          "rogue": (site_folders[1], "--key", str(rogue_key))},
                               "--sites", "1", "--rounds", "1", "--site-keys", str(tmp_path / "cloud-keys"),
                               "--classes", ",".join(str(i) for i in range(10)),
                               tls=_superlink_certificates(tmp_path, GW_ADDR), hosts=hosts)
    assert "sites authenticated by key: a" in text, text[-3000:]
    if hosts is not None:  # site a federated from the other host, through the SuperLink's Fleet-only filter
        assert f"--superlink {GW_ADDR}:" in (tmp_path / "site-a.log").read_text(errors="replace")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["registered_sites"] == ["a"]
    assert [[s["site"] for s in r["sites"]] for r in report["rounds"]] == [["a"]]
    # the aggregate is a's model alone: FedAvg of the one registered site
    glob = loads((tmp_path / "out" / "global.npz").read_bytes())
    a = loads((tmp_path / "site-a" / "site-model.npz").read_bytes())
    initial = loads((tmp_path / "out" / "initial.npz").read_bytes())
    assert set(glob) == set(a) and all(np.array_equal(glob[k], a[k]) for k in glob)
    assert any(not np.allclose(glob[k], initial[k]) for k in glob)
    # the rogue was refused by the SuperLink (its key unknown) and never received a model
    link = (tmp_path / "out" / "superlink.log").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in link
    assert len(set(re.findall(r"\[Fleet.ActivateNode\] Activated node_id=(\d+)", link))) == 1  # a's node only
    rogue = (tmp_path / "site-rogue.log").read_text(errors="replace")
    assert "Failed to activate SuperNode" in rogue and "starting it again" in rogue, rogue[-2000:]
    assert not (tmp_path / "site-rogue" / "rounds").exists() and not (tmp_path / "site-rogue" / "site-model.npz").exists()


def test_superlink_ends_with_a_killed_server_and_a_stale_one_is_stopped_on_the_next_start(tmp_path):
    import json

    from tierlite.cloud.federated.server import SUPERLINK_PID_FILE, stop_stale_superlink
    from tierlite.federated import flower_command, flower_processes, process_start_tick
    from tierlite.tools.stack import free_port

    def gone(pid: int, tick: int, within: float) -> bool:
        deadline = time.monotonic() + within
        while process_start_tick(pid) == tick and time.monotonic() < deadline:
            time.sleep(0.5)
        return process_start_tick(pid) != tick

    # 1. `federate server` SIGKILLed (the process alone, as the OOM killer would): its SuperLink ends too
    port = free_port()
    record_file = tmp_path / "out" / SUPERLINK_PID_FILE
    launched = f"--runtime-api-address\x00127.0.0.1:{port}\x00".encode()  # the SuperLink's SuperExec, ServerApp
    server = _run_server(tmp_path, port, "--sites", "2", "--rounds", "1", "--classes", "0,1")
    try:
        deadline = time.monotonic() + 300
        while not flower_processes(launched):  # the SuperLink is up and has launched its SuperExec
            assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        record = json.loads(record_file.read_text())
        assert process_start_tick(record["pid"]) == record["start_tick"] and record["port"] == port
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        assert gone(record["pid"], record["start_tick"], 60), "the SuperLink outlived its killed server"
        deadline = time.monotonic() + 60  # its SuperExec / ServerApp follow it
        while flower_processes(launched) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not flower_processes(launched)
    finally:
        _kill(server)  # its group: `flwr run`

    # 2. a SuperLink that does not end with its parent (an older tierlite's, or started by hand),
    # recorded in the output folder: the next start stops it; a record naming a live process that
    # is not that one (same pid, another start tick) is left alone
    port = free_port()
    out = tmp_path / "out2"
    out.mkdir()
    with open(out / "superlink.log", "wb") as logf:
        orphan = subprocess.Popen(flower_command("flwr.superlink.cli:flower_superlink", "flower-superlink")
                                  + ["--host", "127.0.0.1", "--port", str(port), "--insecure"],
                                  stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        (out / SUPERLINK_PID_FILE).write_text(json.dumps({"pid": os.getpid(), "start_tick": 1, "port": port}))
        assert stop_stale_superlink(out) is False and not (out / SUPERLINK_PID_FILE).exists()
        tick = process_start_tick(orphan.pid)
        (out / SUPERLINK_PID_FILE).write_text(json.dumps({"pid": orphan.pid, "start_tick": tick, "port": port}))
        assert stop_stale_superlink(out) is True
        assert orphan.wait(30) is not None and not (out / SUPERLINK_PID_FILE).exists()
    finally:
        _kill(orphan)


def test_secure_aggregation_equals_fedavg_within_its_quantisation(tmp_path, site_folders):
    """Flower's SecAgg+ (SecAggPlusWorkflow + secaggplus_mod), SuperLink + 3 SuperNodes: the cloud
    unmasks only the sum, and that average is plain FedAvg's of what the sites trained, to within
    SecAgg+'s quantisation (weights clipped to +-8, 2**22 levels, weighted by examples/10000)."""
    import json

    text = _run_federation(tmp_path, {name: (folder,) for folder, name in zip(site_folders, "abc")},
                           "--secagg", "--sites", "3", "--min-sites", "3", "--rounds", "1",
                           "--classes", ",".join(str(i) for i in range(10)))
    assert "secure aggregation (SecAgg+)" in text
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (entry,) = report["rounds"]
    assert entry["secagg"] and entry["clients"] == 3
    agg = entry["aggregate"]  # the sites' own validation accuracy, weighted, as in the plain report
    assert agg["val-acc-cloud"] == pytest.approx(sum(s["val-acc-cloud"] * s["examples"] for s in entry["sites"])
                                                 / agg["examples"])
    examples = {s["site"]: s["examples"] for s in entry["sites"]}
    sent = {n: loads((tmp_path / f"site-{n}" / "site-model.npz").read_bytes()) for n in "abc"}
    fedavg = weighted_average([sent[n] for n in "abc"], [examples[n] for n in "abc"])
    secure = loads((tmp_path / "out" / "global.npz").read_bytes())
    # each site's contribution carries up to one quantisation step (2 * 8 / 2**22) of its weighted
    # value (stochastic rounding): at most 3 steps over the sum of the weights (examples / max_weight
    # 10000); plus the weights' own rounding (to 1/2**22) and float32's
    tolerance = 3 * (2 * 8.0 / 2 ** 22) / (sum(examples.values()) / 10000.0) + 1e-6
    error = max(float(np.max(np.abs(secure[k] - fedavg[k]))) for k in fedavg)
    assert 0 < error <= tolerance, (error, tolerance)
    for n in "abc":  # and the aggregate is none of the inputs
        assert max(float(np.max(np.abs(secure[k] - sent[n][k]))) for k in fedavg) > 10 * tolerance
    # the protocol's four round trips per round at every site, the masked weights in the third
    for n in "abc":
        lines = [json.loads(l) for l in (tmp_path / f"site-{n}" / "traffic.jsonl").read_text().splitlines()]
        assert [l["stage"] for l in lines] == ["setup", "share_keys", "collect_masked_vectors", "unmask"], lines
        assert lines[2]["bytes_up"] > sum(v.nbytes for v in sent[n].values())


def test_superlink_serves_other_hosts_its_fleet_api_only(tmp_path):
    """`federate server --host 0.0.0.0`: Flower 1.42 serves its Control API (`flwr run`, key
    registration) and the ServerApp's runtime API on the Fleet port without account
    authentication, so a host on the network gets the Fleet API (what SuperNodes call) and a 403
    for anything else. A real SuperLink in a network namespace of its own, probed from a second
    namespace over a veth link (another host) and from its own loopback."""
    import json

    from tierlite.cloud.federated.server import check_superlink_host
    from tierlite.errors import ConfigError
    from tierlite.federated import flower_command
    from tierlite.tools.bench.partition import GW_ADDR

    for host, insecure, superlink, expected in [
            ("10.0.0.5", False, None, "give a loopback address, or 0.0.0.0 for sites"),
            ("::", False, None, "give a loopback address, or 0.0.0.0 for sites"),
            ("0.0.0.0", True, None, "with --insecure: the sites' weights would cross the network in plain HTTP"),
            ("0.0.0.0", False, "127.0.0.1:9092", "not to a running one (--superlink)")]:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            check_superlink_host(host, insecure, superlink)
    check_superlink_host("127.0.0.1", True)  # loopback: --insecure is fine (tests, one machine)
    check_superlink_host("::1", True)
    port = 9712
    probe = ("import json, sys, urllib.request, urllib.error\n"
             "out = {}\n"
             "for path in sys.argv[2:]:\n"
             "    req = urllib.request.Request(sys.argv[1] + path, data=b'' if path != '/health' else None)\n"
             "    try:\n"
             "        with urllib.request.urlopen(req, timeout=10) as r: out[path] = [r.status, r.read().decode(errors='replace')]\n"
             "    except urllib.error.HTTPError as e: out[path] = [e.code, e.read().decode(errors='replace')]\n"
             "print(json.dumps(out))\n")
    paths = ["/health", "/v1/control/list-runs", "/v1/runtime/pull-messages", "/v1/fleet/get-run"]
    with _two_hosts() as ns:
        if ns is None:
            pytest.skip("network namespaces unavailable (root and iproute2 needed)")
        link = subprocess.Popen(ns.prefix("gw") + flower_command("flwr.superlink.cli:flower_superlink", "flower-superlink")
                                + ["--host", "0.0.0.0", "--port", str(port), "--insecure",
                                   "--disable-runtime-dependency-installation"],
                                stdout=open(tmp_path / "superlink.log", "wb"), stderr=subprocess.STDOUT,
                                env={**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}, start_new_session=True)
        try:
            def answers(where: str, base: str) -> dict:
                run = subprocess.run(ns.prefix(where) + [sys.executable, "-c", probe, base, *paths],
                                     capture_output=True, text=True, timeout=60)
                assert run.returncode == 0, run.stderr[-2000:]
                return json.loads(run.stdout)

            deadline = time.monotonic() + 120
            while True:
                try:
                    local = answers("gw", f"http://127.0.0.1:{port}")
                    break
                except AssertionError:
                    assert time.monotonic() < deadline and link.poll() is None, \
                        (tmp_path / "superlink.log").read_text(errors="replace")[-3000:]
                    time.sleep(1)
            remote = answers("node", f"http://{GW_ADDR}:{port}")
        finally:
            _kill(link)
    refusal = "tierlite: only the Fleet API (/v1/fleet/) is served to other hosts"
    assert local["/health"][0] == 200 and all(refusal not in body for _, body in local.values()), local
    assert all(remote[p] == [403, refusal + "\n"] for p in paths[:3]), remote
    assert remote["/v1/fleet/get-run"][0] != 403 and refusal not in remote["/v1/fleet/get-run"][1], remote
    assert remote["/v1/fleet/get-run"] == local["/v1/fleet/get-run"]  # the Fleet API answers both alike
