"""Moved to ``duollm.study.synthetic``; this name keeps old imports working."""
from .study.synthetic import *  # noqa: F401,F403
from .study.synthetic import KIND_NAMES, SyntheticLabels, make_synthetic_data  # noqa: F401
