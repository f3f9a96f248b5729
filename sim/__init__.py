"""splitcontrol's engine package: sim.core (the library), sim.engine (the Flower engine), sim.commands (the CLI).

Imports nothing of the project (tests/test_layers.py). It only makes every use of the
package offline: no Hugging Face hub access, whatever imports it first.
"""
import os

for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
