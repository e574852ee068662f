"""Puts the network guard into every Python process the tests start (see network_guard.py)."""

import network_guard

network_guard.install()
