"""A tiny model for the scorefront examples: the sum of the numbers in `data`."""

import json
import os

VERSION = os.environ.get("MODEL_VERSION", "unknown")


def init():
    """Runs once per worker; the server answers GET / with "Healthy" only after it."""


def run(raw_data):
    data = json.loads(raw_data)["data"]
    return {"sum": sum(data), "version": VERSION}
