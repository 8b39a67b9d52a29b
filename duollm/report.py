"""Moved to ``duollm.study.report``; this name keeps old imports working."""
from .study.report import *  # noqa: F401,F403
