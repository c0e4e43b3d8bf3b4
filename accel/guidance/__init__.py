"""Guidance methods: change what the denoiser's prediction is guided towards (quality knobs, not speed)."""
