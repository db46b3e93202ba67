"""Co-updating in the cloud: retrain a bundle's exit heads (or end segment) on what the fleet
escalated, judge the candidate, and schedule runs from the cloud worker. options.py, data.py,
chain.py, head.py (TFLite head surgery), distill.py (the math), end_segment.py, judge.py,
job.py (`retrain()`), scheduler.py. docs/UPDATES.md has the method and the results."""
from tierlite.cloud.retrain.chain import Chain
from tierlite.cloud.retrain.data import load_hard_examples
from tierlite.cloud.retrain.distill import fit_head
from tierlite.cloud.retrain.end_segment import PROFILE_FRAMES, build_end_profile, retrain_end_segment
from tierlite.cloud.retrain.head import Head
from tierlite.cloud.retrain.job import judge_candidate, retrain
from tierlite.cloud.retrain.options import (END_SCOPES, PRIVACY_MODES, PrivacyPolicy, RetrainOptions, RetrainReport,
                                            default_frames_path)
from tierlite.cloud.retrain.scheduler import RetrainScheduler

__all__ = [
    "END_SCOPES", "PRIVACY_MODES", "PROFILE_FRAMES", "Chain", "Head", "PrivacyPolicy", "RetrainOptions",
    "RetrainReport", "RetrainScheduler", "build_end_profile", "default_frames_path", "fit_head", "judge_candidate",
    "load_hard_examples", "retrain", "retrain_end_segment",
]
