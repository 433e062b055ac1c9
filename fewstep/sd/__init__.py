"""Stable Diffusion teachers (SDXL, SD1.5): the pieces the pipelines under pipelines/sdxl and
pipelines/sd15 share — params schema, teacher checks, encode cache, VE denoiser, export."""
