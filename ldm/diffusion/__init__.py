"""Diffusion math, pure: schedules, parameterisations, samplers, guidance. No networks, no Lightning."""
