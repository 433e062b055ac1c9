"""Text-to-image teachers (SDXL, SD1.5, SD3): the pieces the pipelines under pipelines/sdxl, pipelines/sd15
and pipelines/sd3 share — start-up, teacher checks, encode cache, VE denoiser, export."""
