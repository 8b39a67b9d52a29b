"""Run folders: a loader given the folder of a training run finds its newest complete step.

``duollm train --out RUN`` and ``duollm train --hf ... --out RUN`` write ``RUN/step_N``
checkpoints, each complete once its ``meta.json`` is written (the last file of a save).
``load_checkpoint``, ``duollm.hf.load_converted``/``load_pretrained`` and ``duollm study --hf``
accept any of:

* the model folder itself (what they always took);
* a ``train --hf`` step folder, ``RUN/step_N``, whose model is in ``RUN/step_N/model``;
* the run folder ``RUN``: its newest complete ``step_N`` (then that step's ``model``).

This module imports nothing of duollm, so every loader can use it without an import cycle.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional, Tuple

STEP_RE = re.compile(r"^step_(\d+)$")
META = "meta.json"  # written last by every checkpoint save: marks a step folder complete


def complete_steps(run_dir) -> List[Tuple[int, str]]:
    """``(N, path)`` of every complete ``step_N`` folder in ``run_dir``, oldest first."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        return []
    found = []
    for entry in os.listdir(run_dir):
        match = STEP_RE.match(entry)
        path = os.path.join(run_dir, entry)
        if match and os.path.isfile(os.path.join(path, META)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def newest_step(run_dir) -> Optional[str]:
    """The complete ``step_N`` folder of ``run_dir`` with the largest N, or None."""
    steps = complete_steps(run_dir)
    return steps[-1][1] if steps else None


def resolve_model_folder(path, marker: str, inner: Optional[str] = None) -> str:
    """The folder a loader should read for ``path`` (see the module docstring).

    ``marker``: a file that only the wanted folder holds (``"meta.json"`` for a ``DuoLLM``
    checkpoint, ``"config.json"`` or ``"duollm.json"`` for a Hugging Face one); ``inner``: the
    sub-folder of a step folder that holds the model (``"model"`` for ``train --hf``), if any.
    ``path`` comes back unchanged when it holds ``marker`` itself or is no run or step folder
    (the loader then reports what is wrong with it).
    """
    if not isinstance(path, (str, os.PathLike)):
        return path  # the loader's own check names the mistake
    path = os.fspath(path)
    if not isinstance(path, str) or not os.path.isdir(path):
        return path
    if os.path.isfile(os.path.join(path, marker)):
        return path
    if inner is not None and os.path.isfile(os.path.join(path, inner, marker)):
        return os.path.join(path, inner)
    step = newest_step(path)
    if step is None:
        return path
    for candidate in ([os.path.join(step, inner)] if inner is not None else []) + [step]:
        if os.path.isfile(os.path.join(candidate, marker)):
            return candidate
    return path
