"""Defenses as swappable components (one file per defense, registered by name).

Empty until the defenses issue: timestep policies, the symmetric-sigmoid activation,
wire quantisation, prompt protection, noise and accounted DP.
"""
