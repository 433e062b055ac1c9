"""Serve the `distill` deployments from this machine (no work pool needed):

    python flows/serve.py            # then: prefect deployment run distill/digits
"""
from prefect import serve

from distill import distill

if __name__ == "__main__":
    serve(
        distill.to_deployment(name="digits", parameters={"pipeline": "default"},
                              description="the embedded default pipeline (dvc.yaml at the repo root)"),
        distill.to_deployment(name="sdxl", parameters={"pipeline": "sdxl"},
                              description="the SDXL pipeline (pipelines/sdxl/dvc.yaml)"),
    )
