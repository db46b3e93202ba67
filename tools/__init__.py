"""tierlite's tools, the top layer: the `tierlite` command line, the demo, the benchmarks and the
local-stack helpers (stack.py) they and the tests share. They may import the tiers and the core;
neither imports them (`python -m tierlite` enters through tierlite/__main__.py, which the layer
contract puts with the tools)."""
