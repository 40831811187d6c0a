"""Differential privacy for federated diffusion: the client-level mechanism and its accountant.

``mechanism`` clips an update and draws the Gaussian noise (both ends use it), ``accounting``
turns the releases into ε at δ with Opacus's RDP accountant. ``fedapp.eval.membership``
measures what they protect.
"""
