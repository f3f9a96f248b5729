"""Named experiment presets that reproduce the paper's comparisons (evaluation issue).

The presets of ``splitcontrol compare`` live in ``sim/presets`` for now.
"""
