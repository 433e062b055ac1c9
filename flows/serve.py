"""Serve the `distill` deployments of prefect.yaml from this machine (no work pool needed; stages run here):

    python flows/serve.py            # then: prefect deployment run distill/digits  (or distill/sdxl-digits, ...)
"""
from pathlib import Path

import yaml
from prefect import serve

from distill import distill


def deployments(prefect_yaml: Path = Path(__file__).resolve().parents[1] / "prefect.yaml"):
    """The distill deployments as prefect.yaml declares them (one list), each running its pipeline here."""
    for entry in yaml.safe_load(prefect_yaml.read_text())["deployments"]:
        if entry.get("entrypoint") == "flows/distill.py:distill":
            yield distill.to_deployment(name=entry["name"], parameters={"pipeline": entry["parameters"]["pipeline"]},
                                        description=entry["description"].split(", cache misses")[0])


if __name__ == "__main__":
    serve(*deployments())
