"""Model families, as equals: each is the one place that knows its teacher. edm/: the EDM UNet trained here from
data; t2i/: the text-to-image families (SDXL, SD1.5, SD3) and their mini teachers. No family imports another."""
