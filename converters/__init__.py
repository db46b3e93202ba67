"""tierlite.converters: image folder -> jointly trained multi-exit model -> int8 / binarized TFLite
segments (end, edge, cloud) -> calibrated exit thresholds -> model bundle.

Entry points (TensorFlow is imported lazily, inside functions):
    tierlite.converters.pipeline.build_bundle(train_dir, out_dir, preset="small", binarized=False, seed=0)
    tierlite.converters.pipeline.export_bundle(model, out_dir, arch=..., classes=..., calib_images=..., ...)
    tierlite.converters.train.load_checkpoint(workdir) -> (keras model, metadata)
    tierlite.converters.calibrate.search_thresholds(...)   (pure numpy)
See docs/CONVERTERS.md.

`__all__` is the API other tiers may use (the cloud's retraining job): import it from here, never
from the submodules.
"""
from tierlite.converters.calibrate import evaluate, search_thresholds
from tierlite.converters.datasets import checkpoint_splits, load_folder_cached, load_splits, representative_frames
from tierlite.converters.export import pixel_representative, tensor_infos, to_tflite
from tierlite.converters.fedtrain import (build_federated_model, exit_accuracy, local_train, model_weights,
                                          recompute_batchnorm, set_model_weights)
from tierlite.converters.models import segments_of
from tierlite.converters.pipeline import default_workdir, export_bundle
from tierlite.converters.train import load_checkpoint

__all__ = [
    "checkpoint_splits", "default_workdir", "evaluate", "load_checkpoint", "load_splits", "pixel_representative",
    "representative_frames", "search_thresholds", "segments_of", "tensor_infos", "to_tflite",
    # co-training (tierlite.cloud.federated, tierlite.edge.federated; docs/COTRAINING.md)
    "build_federated_model", "exit_accuracy", "export_bundle", "load_folder_cached", "local_train", "model_weights",
    "recompute_batchnorm", "set_model_weights",
]
