"""Attacks on what the server sees (one file per attack, registered by name).

Empty until the attack-suite issue: attacks will read only a run's transcript and
declared public knowledge, never client memory.
"""
