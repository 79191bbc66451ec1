"""bench/trl_worker.py (TRL's DPOTrainer on given ids), made to run on older transformers.

    python -m bench.gpu_trl <bench.trl_worker options>

trl_worker passes `activation_checkpointing`, the name transformers 5.23 gave to
TrainingArguments' `gradient_checkpointing`; an older transformers (a GPU machine's, say)
has only the old name and refuses the new one. Here DPOConfig is given whichever name its
transformers has, with the same value; nothing else of the worker changes.
"""

from __future__ import annotations

import dataclasses
import sys

from bench import trl_worker


def compatible_config(config_class):
    names = {f.name for f in dataclasses.fields(config_class)}
    if "activation_checkpointing" in names:
        return config_class

    def build(**kwargs):
        if "activation_checkpointing" in kwargs:
            kwargs["gradient_checkpointing"] = kwargs.pop("activation_checkpointing")
        return config_class(**kwargs)

    return build


if __name__ == "__main__":
    trl_worker.DPOConfig = compatible_config(trl_worker.DPOConfig)
    sys.exit(trl_worker.main())
