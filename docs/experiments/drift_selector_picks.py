# Share of severity-3 frames a profile selector picks, fitted as the retraining job fits it
# (1,000 corrupted test frames vs 2,000 clean training frames, <= 1 % of those picked), scored on
# 1,000 other corrupted test frames and 1,000 other clean training frames; legacy 5 statistics vs all.
import tierlite.conditions as C
from tierlite.data import load_image_folder
from tierlite.tools.bench.corruptions import corrupt

te = load_image_folder("../shared/datasets/cifar10-jpeg/test", (32, 32), limit=2000, seed=0).images
tr = load_image_folder("../shared/datasets/cifar10-jpeg/train", (32, 32), limit=3000, seed=1).images
full = C.frame_stats
for name, stats in (("legacy 5", lambda x: full(x)[:, :len(C.LEGACY_STATS)]), (f"all {len(C.STATS)}", full)):
    C.frame_stats = stats
    for fam in ("noise", "blur", "fog", "low_light", "contrast"):
        c = corrupt(te, fam, 3, seed=1)
        s = C.Selector.fit(c[:1000], tr[:2000])
        print(f"{name}: {fam} 3 picks {s.picks(c[1000:]).mean() * 100:.1f} % of corrupted, "
              f"{s.picks(tr[2000:]).mean() * 100:.1f} % of clean held-out frames", flush=True)
