"""Reading what a training run wrote into OUT."""

import json
import os


def read_log(out):
    """The run's loss.jsonl entries ({"step", "loss", "time"})."""
    with open(os.path.join(out, "loss.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_losses(out):
    return [entry["loss"] for entry in read_log(out)]
