"""Serve the `distill` deployments from this machine (no work pool needed):

    python flows/serve.py            # then: prefect deployment run distill/digits  (or distill/sdxl, distill/sd15, distill/sd3)
"""
from prefect import serve

from distill import distill

if __name__ == "__main__":
    serve(
        distill.to_deployment(name="digits", parameters={"pipeline": "default"},
                              description="the embedded default pipeline (dvc.yaml at the repo root)"),
        distill.to_deployment(name="sdxl", parameters={"pipeline": "sdxl"},
                              description="the SDXL pipeline (pipelines/sdxl/dvc.yaml)"),
        distill.to_deployment(name="sd15", parameters={"pipeline": "sd15"},
                              description="the SD1.5 pipeline (pipelines/sd15/dvc.yaml)"),
        distill.to_deployment(name="sd3", parameters={"pipeline": "sd3"},
                              description="the SD3 pipeline (pipelines/sd3/dvc.yaml)"),
    )
