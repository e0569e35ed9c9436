"""Weights in other ecosystems' formats: CompVis / Stable Diffusion checkpoints and diffusers folders."""
