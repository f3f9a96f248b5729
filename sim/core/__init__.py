"""The library: config, data, models, cut points, diffusion maths, wire types, metrics, figures.

Imports nothing from defenses/, strategies/, attacks/ or the engine (tests/test_layers.py)."""
