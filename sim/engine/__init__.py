"""The engine: run context, Flower ServerApp/ClientApp, grid, transcript, runner, evaluation, scorer."""
