"""tierlite: end-edge-cloud co-inference for camera fleets.

The core package holds what every tier shares: the wire format, the model bundle, the exit
policy, the runtime plugins. Tiers (tierlite.device, .edge, .cloud, .converters) import the core,
never each other; the tools (tierlite.tools: CLI, demo, benchmarks) sit above both.
"""

__version__ = "0.1.0"
