"""Tables, targets, notes and plots of `tierlite bench accuracy`."""
from __future__ import annotations

from typing import Any

from tierlite.tools.bench.report import Report, Target, markdown_table

# Targets from the brief (reported against, never asserted).
T_END_ACC = Target("end model standalone top-1", 80.0, True, " %", " pt")
T_END_BYTES = Target("end model bytes", 64 * 1024, False, " B")
T_SYSTEM_ACC = Target("system top-1", 90.0, True, " %", " pt")
T_CAMERA_SHARE = Target("frames decided on camera (within 0.5 pt of cloud-only)", 75.0, True, " %", " pt")
T_WITHIN = Target("top-1 gap to cloud-only", 0.5, False, " pt")
T_UPLINK = Target("uplink reduction vs JPEG offload", 10.0, True, "x")
T_CAMERA_P50 = Target("camera decision p50", 0.2, False, " ms")
T_ESCALATION_P99 = Target("escalation round trip p99", 10.0, False, " ms")


NOTES = [
    "uplink = camera -> first hop, mean over all frames (frames decided on the camera send nothing). "
    "tierlite: a tierlite.wire FEATURE message (header, shape, end logits, feature) per escalated frame; "
    "offload: frame id + JPEG file per frame. 'MQTT' adds topic, properties and fixed header of an MQTT 5 "
    "PUBLISH at QoS 0 (TCP/IP headers excluded on both sides). The node's optional JSON result event "
    "(<prefix>/<node>/result, for applications) is excluded on both sides.",
    "thresholds of each operating point are chosen on validation data (source in results.json), never on these frames.",
    "camera decision = end segment invoke + exit decision on a decoded frame, 1 thread, the end model back to back "
    "over blocks of 64 frames as on a camera (not right after the other tiers' models).",
    "e2e offline = compute of every tier a frame visits (cloud-only: JPEG decode + full chain), no network.",
    "e2e real = frame in hand -> result back at the camera through Mosquitto on loopback and real worker "
    "processes, on the stratified subset of frames given by --e2e-frames.",
]


def _pct(x: Any) -> str:
    return "–" if x is None else f"{x:.2f}"


def _ms(x: Any) -> str:
    return "–" if x is None else f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _pair(a: str, b: str, f=_ms):
    return lambda r: f"{f(r.get(a))} / {f(r.get(b))}"


COLUMNS = [
    ("config", "configuration", str),
    ("top1", "top-1 %", _pct),
    ("shares", "decided end / edge / cloud %", None),
    ("uplink_payload_B", "uplink B/frame (payload)", None),
    ("uplink_mqtt_B", "uplink B/frame (MQTT)", None),
    ("uplink_reduction_x", "vs JPEG offload", lambda x: "–" if x is None else f"{x:.1f}x"),
    ("camera", "camera decision p50 / p99 ms", None),
    ("e2e_offline", "e2e offline p50 / p99 ms", None),
    ("e2e_real", "e2e real p50 / p99 ms (n)", None),
    ("camera_model_B", "model bytes on camera", None),
]


def _display_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        d = dict(r)
        d["shares"] = f"{r['share_end']:.1f} / {r['share_edge']:.1f} / {r['share_cloud']:.1f}"
        d["camera"] = _pair("camera_p50_ms", "camera_p99_ms")(r)
        d["e2e_offline"] = _pair("e2e_offline_p50_ms", "e2e_offline_p99_ms")(r)
        d["e2e_real"] = (f"{_ms(r['e2e_real_p50_ms'])} / {_ms(r['e2e_real_p99_ms'])} ({r['e2e_real_n']})"
                         if r.get("e2e_real_n") else "–")
        if r["kind"] == "cloud-only":
            d["camera_model_B"] = "0 (camera sends JPEG)"
        out.append(d)
    return out


def _first(rows, **match) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The brief's targets, each against the row it is about (the most accurate tierlite int8
    operating point = smallest drop)."""
    out: list[dict[str, Any]] = []
    cam = _first(rows, kind="camera-only")
    cloud = _first(rows, kind="cloud-only")
    ops = sorted((r for r in rows if r["kind"] == "tierlite" and r["config"].startswith("tierlite int8")),
                 key=lambda r: r["drop_pt"])
    op = ops[0] if ops else None

    def add(target: Target, value, where: str):
        out.append({**target.check(value), "config": where})

    if cam:
        add(T_END_ACC, cam["top1"], cam["config"])
        add(T_END_BYTES, float(cam["camera_model_B"]), cam["config"])
        add(T_CAMERA_P50, cam["camera_p50_ms"], cam["config"])
    bin_cam = _first(rows, config="camera-only binary (end exit decides all)")
    if bin_cam:
        add(T_END_ACC, bin_cam["top1"], bin_cam["config"])
        add(T_END_BYTES, float(bin_cam["camera_model_B"]), bin_cam["config"])
        add(T_CAMERA_P50, bin_cam["camera_p50_ms"], bin_cam["config"])
    if op:
        add(T_SYSTEM_ACC, op["top1"], op["config"])
        add(T_CAMERA_SHARE, op["share_end"], op["config"])
        if cloud:
            add(T_WITHIN, cloud["top1"] - op["top1"], f"{op['config']} vs cloud-only")
        if op["uplink_mqtt_B"] == 0:  # every frame decided on the camera: no uplink at all
            out.append({**T_UPLINK.check(None), "met": True, "status": "met (nothing sent up)",
                        "config": op["config"] + " (MQTT bytes)"})
        else:
            add(T_UPLINK, op.get("uplink_reduction_x"), op["config"] + " (MQTT bytes)")
        add(T_ESCALATION_P99, op.get("escalation_real_p99_ms"), op["config"] + " (real runtime, escalated frames)")
        if op.get("e2e_real_n") and not op.get("escalation_real_n"):
            out[-1]["status"] = "n/a: no frame of the subset escalated"
    return out


TARGET_COLUMNS = [("target", "target", str), ("config", "measured on", str), ("goal", "goal", str),
                  ("measured", "measured", None), ("status", "status", str)]


REAL_COLUMNS = [
    ("config", "configuration", str), ("e2e_real_n", "frames", None),
    ("real_top1", "top-1 % real", _pct), ("subset_offline_top1", "top-1 % offline, same frames", _pct),
    ("real_shares", "decided end / edge / cloud % real (offline)", str),
    ("camera_real", "camera decision p50 / p99 ms", str), ("e2e_real", "e2e p50 / p99 ms", str),
    ("escalation_real", "escalated frames p50 / p99 ms (n)", str), ("real_fallbacks", "fallbacks", None),
    ("real_missing", "missing results", None),
]


def _real_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if not r.get("e2e_real_n"):
            continue
        d = dict(r)
        rs, os_ = r.get("real_share"), r.get("subset_offline_share")
        d["real_shares"] = (" / ".join(f"{rs[t]:.1f} ({os_.get(t, 0):.1f})" for t in ("end", "edge", "cloud"))
                            if rs and os_ else "–")
        d["camera_real"] = _pair("camera_real_p50_ms", "camera_real_p99_ms")(r)
        d["e2e_real"] = _pair("e2e_real_p50_ms", "e2e_real_p99_ms")(r)
        d["escalation_real"] = (f"{_ms(r.get('escalation_real_p50_ms'))} / {_ms(r.get('escalation_real_p99_ms'))} "
                                f"({r.get('escalation_real_n', 0)})")
        out.append(d)
    return out


def write_accuracy_report(report: Report, rows: list[dict[str, Any]], targets: list[dict[str, Any]],
                          e2e_n: int) -> None:
    bundles = "; ".join(f"{k}: {b['name']} v{b['version']} (segments "
                        + ", ".join(f"{t} {v:,} B" for t, v in b["segment_bytes"].items()) + ")"
                        for k, b in report.results["bundles"].items())
    report.add_markdown(f"{rows[0]['frames']:,} frames; real-runtime end-to-end on a stratified subset of "
                        f"{e2e_n} frames per networked configuration. Bundles: {bundles}.\n")
    report.add_markdown(markdown_table(COLUMNS, _display_rows(rows)))
    real = _real_rows(rows)
    if real:
        report.add_markdown(f"Real runtime ({e2e_n} frames per configuration, offered one at a time at a camera's "
                            "pace; Mosquitto, `tierlite edge`, `tierlite cloud` / the offload worker as separate "
                            "processes on loopback; the camera node is tierlite.device's daemon):\n\n"
                            + markdown_table(REAL_COLUMNS, real))
    report.add_markdown("Targets (from the brief; reported, not asserted):\n\n" + markdown_table(TARGET_COLUMNS, targets))
    report.add_markdown("\n".join(f"- {n}" for n in NOTES))
    report.scatter_plot("tradeoff", [(r["config"], r["uplink_mqtt_B"], r["top1"]) for r in rows],
                        "mean uplink bytes / frame, MQTT (symlog)", "top-1 %",
                        "Accuracy against camera uplink, same frames", logx=True)
    plot_rows = [r for r in rows if r["uplink_mqtt_B"] > 0] or rows
    report.bar_plot("uplink", [r["config"] for r in plot_rows], [r["uplink_mqtt_B"] for r in plot_rows],
                    "mean uplink bytes / frame (MQTT)", "Camera uplink per frame", log=True)
    report.bar_plot("top1", [r["config"] for r in rows], [r["top1"] for r in rows], "top-1 %",
                    "Top-1 on the same frames", hline=T_SYSTEM_ACC.goal)
    report.bar_plot("camera-latency", [r["config"] for r in rows if r["camera_p50_ms"] is not None],
                    [r["camera_p50_ms"] for r in rows if r["camera_p50_ms"] is not None],
                    "camera decision p50 (ms)", "Camera decision latency", hline=T_CAMERA_P50.goal)


def print_summary(rows: list[dict[str, Any]], targets: list[dict[str, Any]]) -> None:
    cols = [c for c in COLUMNS if c[0] in ("config", "top1", "shares", "uplink_mqtt_B", "camera", "e2e_real")]
    print(markdown_table(cols, _display_rows(rows)))
    print()
    print(markdown_table(TARGET_COLUMNS, targets))

