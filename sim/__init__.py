"""The simulation engine: config, data, models, cut points, wire payloads, apps, runner, metrics, CLI."""
