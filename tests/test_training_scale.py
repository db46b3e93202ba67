"""Training that survives interruptions and spans processes: --resume after a kill, and two
MultiWorkerMirroredStrategy workers on loopback training in lockstep (real processes, digits)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

# Batch 16: ~2 s per epoch, so the test can stop a run between two epochs.
TRAIN_ARGS = ["--preset", "small", "--set", "limit=900", "--set", "batch_size=16"]


def _train_cmd(digits_dir: Path, workdir: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tierlite", "train", str(digits_dir / "train"), "--workdir", str(workdir),
            "--epochs", str(epochs), *TRAIN_ARGS, *extra]


def _history(workdir: Path) -> list[dict]:
    meta = workdir / "checkpoint" / "model.json"
    return json.loads(meta.read_text())["history"] if meta.is_file() else []


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", **extra)


def test_resume_continues_a_killed_run(digits_dir, tmp_path):
    work = tmp_path / "w"
    proc = subprocess.Popen(_train_cmd(digits_dir, work, 3), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(_history(work)) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    first = _history(work)
    assert len(first) == 1, f"expected the run killed after epoch 1, checkpoint holds {len(first)} epochs"
    steps_per_epoch = int(np.load(work / "checkpoint" / "optimizer.npz")["arr_0"])  # optimizer.iterations

    out = subprocess.run(_train_cmd(digits_dir, work, 3, "--resume"), env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming" in out.stderr and "after epoch 1 of 3" in out.stderr
    history = _history(work)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[0] == first[0]  # the finished epoch is kept, not retrained
    # The step counter (and so the LR schedule) ran on from the killed run's, not from zero.
    assert steps_per_epoch > 0
    assert int(np.load(work / "checkpoint" / "optimizer.npz")["arr_0"]) == 3 * steps_per_epoch

    again = subprocess.run(_train_cmd(digits_dir, work, 3, "--resume"), env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "nothing to train" in again.stderr
    wrong = subprocess.run(_train_cmd(digits_dir, work, 3, "--resume", "--set", "lr=0.3"), env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0 and "another configuration" in wrong.stderr


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_workers_on_loopback_train_in_lockstep(digits_dir, tmp_path):
    from tierlite.converters.train import load_checkpoint

    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    work = tmp_path / "w"
    procs = [subprocess.Popen(_train_cmd(digits_dir, work, 1),
                              env=_env(TF_CONFIG=json.dumps({"cluster": cluster,
                                                             "task": {"type": "worker", "index": i}})),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    for p, text in zip(procs, logs):
        assert p.returncode == 0, text[-3000:]
    assert all("on 2 replica(s) (CollectiveAllReduceStrategy)" in text for text in logs)  # MWMS

    chief, _ = load_checkpoint(work)
    other, _ = load_checkpoint(work / "worker-1")
    trained = [w.numpy() for w in chief.trainable_weights]
    assert any(np.abs(w).sum() > 0 for w in trained)
    # All-reduced gradients: both workers hold the same weights after every step.
    for a, b in zip(trained, (w.numpy() for w in other.trainable_weights)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_only_where_the_cpu_computes_it():
    """mixed_bfloat16 on a CPU without native bf16 is emulated (4 img/s against 18 in float32 on
    an AVX2-only EPYC): the preset's mixed precision applies only where every core has the flag."""
    from tierlite.converters.distribute import native_bf16

    epyc_avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx fma avx2\nprocessor\t: 1\nflags\t\t: fpu sse2 avx fma avx2\n"
    epyc_bf16 = epyc_avx2.replace("avx2", "avx2 avx512f avx512_bf16")
    xeon_amx = "flags\t\t: avx2 avx512f amx_tile amx_bf16\n"
    arm_bf16 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"
    arm_plain = "Features\t: fp asimd evtstrm\n"
    mixed_cores = epyc_bf16 + "flags\t\t: avx2\n"
    assert [native_bf16(s) for s in (epyc_avx2, epyc_bf16, xeon_amx, arm_bf16, arm_plain, mixed_cores, "")] == \
        [False, True, True, True, False, False, False]
