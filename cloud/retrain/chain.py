"""The parent bundle's deployed int8 chain (end, edge, cloud segments, condition variants), with
the exit heads exposed: what the heads see and what each exit answers, for frames or stored end
features."""
from __future__ import annotations

import numpy as np

from tierlite.bundle import TIERS, Bundle
from tierlite.cloud.retrain.head import Head
from tierlite.policy import mirror, mirror_average
from tierlite.wire import as_received


class Chain:
    """The parent bundle's int8 segments, heads exposed; feeds frames or stored end features."""

    def __init__(self, bundle: Bundle):
        from tierlite.conditions import end_variants
        from tierlite.segment import Segment

        self.bundle = bundle
        self.heads = {t: Head(bundle.segment_path(t).read_bytes(), t) for t in ("end", "edge")}
        self.variants = [(sel, Head((bundle.root / f).read_bytes(), "end")) for f, sel in end_variants(bundle.manifest)]
        self.cloud = Segment(bundle, "cloud")
        self.info = {t: bundle.segment(t) for t in TIERS}

    def _logits(self, tier: str, raw: np.ndarray) -> np.ndarray:
        lo = self.info[tier].output("logits")
        return ((raw.astype(np.float64) - lo.zero_point) * lo.scale).reshape(len(raw), -1)

    def from_end_features(self, feats: np.ndarray) -> dict[str, np.ndarray]:
        """Edge pooled features, edge logits and cloud logits for int8 end features (N, ...)."""
        pooled, outs = self.heads["edge"].run(feats)
        info = self.info["edge"]
        edge_logits = self._logits("edge", outs[info.output("logits").index])
        edge_feats = outs[info.output("feature").index]
        cloud = np.stack([self.cloud.run(f[None]).logits for f in edge_feats]) if len(feats) else np.zeros((0, 0))
        return {"edge_pooled": pooled, "edge_logits": edge_logits, "cloud_logits": cloud.astype(np.float64)}

    def _end(self, images: np.ndarray):
        pooled, outs = self.heads["end"].run(images)
        for selector, head in self.variants:  # as Segment does on the node: per frame
            picked = selector.picks(images) if len(images) else np.zeros(0, bool)
            if picked.any():
                p_pooled, p_outs = head.run(images[picked])
                pooled[picked] = p_pooled
                for o, po in zip(outs, p_outs):
                    o[picked] = po
        return pooled, outs

    def from_frames(self, images: np.ndarray) -> dict[str, np.ndarray]:
        pooled, outs = self._end(images)
        info = self.info["end"]
        feats = outs[info.output("feature").index]
        end_logits = self._logits("end", outs[info.output("logits").index])
        if info.test_time_augmentation:  # the exit decides on the frame and its mirror image, as on the node
            mirrored = self._logits("end", self._end(mirror(images))[1][info.output("logits").index])
            end_logits = mirror_average(end_logits, mirrored).astype(np.float64)
        # The edge gets the feature as the wire carries it (a uniform encoding's levels), as deployed.
        out = self.from_end_features(as_received(feats, self.bundle.encoding))
        out.update(end_pooled=pooled, end_logits=end_logits, end_features=feats)
        return out
