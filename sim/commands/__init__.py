"""Commands and reports: the CLI, sweeps, benchmarks, cost accounting, pretraining."""
