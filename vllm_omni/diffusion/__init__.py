"""Diffusion (DiT) model support."""
