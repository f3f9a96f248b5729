"""Named experiment presets (TOML), run with ``splitcontrol sweep baselines/NAME.toml``.

paper-main, defense-sweep, timestep-sweep, attack-matrix and clients-scaling: see the
README's "Baseline presets" for what each compares, its wall time and its committed
reference outputs (results/reference/NAME/). sim/commands/sweep.py reads them; the presets of a
single ``compare`` run live in sim/presets.
"""
