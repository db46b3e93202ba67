"""tierlite.converters: image folder -> jointly trained multi-exit model -> int8 / binarized TFLite
segments (end, edge, cloud) -> calibrated exit thresholds -> model bundle.

Entry points (TensorFlow is imported lazily, inside functions):
    tierlite.converters.pipeline.build_bundle(train_dir, out_dir, preset="small", binarized=False, seed=0)
    tierlite.converters.pipeline.export_bundle(model, out_dir, arch=..., classes=..., calib_images=..., ...)
    tierlite.converters.train.load_checkpoint(workdir) -> (keras model, metadata)
    tierlite.converters.calibrate.search_thresholds(...)   (pure numpy)
See docs/CONVERTERS.md.
"""
