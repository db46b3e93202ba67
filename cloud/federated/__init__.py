"""Co-training, cloud side (docs/COTRAINING.md): Flower's SuperLink runs tierlite's ServerApp
(`app.py`), whose strategy (`strategy.py`: FedAvg orchestration, tierlite's checks and math from
`tierlite.federated`) aggregates the sites' weights; `server.py` starts the SuperLink, submits the
run (`flwr run`), and exports the aggregated model through the converters into a bundle.

Flower is imported only by `app.py` and `strategy.py` (the `[federated]` extra)."""
