"""Committed results name no machine's paths, and the writers do not put them there."""
import os
import re
import sys

from duollm.bench.results import ROOT, command_line, scrub_paths

RESULTS = os.path.join(ROOT, "benchmarks", "results")
# an absolute path under a folder that only exists on some machine (not /dev/null, not URLs)
MACHINE_PATH = re.compile(r"(?<![\w.<>~:/-])/(?:work|root|home|tmp|opt|usr|var|mnt|srv|Users)"
                          r"/[^\s\"']*")


def test_committed_results_name_no_machine_paths():
    found = []
    for dirpath, _, filenames in os.walk(RESULTS):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                text = open(path, encoding="utf-8").read()
            except UnicodeDecodeError:  # plots
                continue
            found += [f"{os.path.relpath(path, ROOT)}: {m}" for m in MACHINE_PATH.findall(text)]
    assert not found, "machine paths in committed results:\n" + "\n".join(found[:20])


def test_the_pattern_catches_what_it_must():
    assert MACHINE_PATH.findall("source /root/.pyenv/versions/3.11.7/lib/python3.11/*.py")
    assert MACHINE_PATH.findall('"command": "/work/main/duollm/bench/__main__.py decode"')
    assert not MACHINE_PATH.findall("see https://example.org/home/x and <venv>/lib/python")


def test_command_line_is_what_a_user_types_without_paths():
    bench = os.path.join(ROOT, "duollm", "bench", "__main__.py")
    top = os.path.join(ROOT, "duollm", "__main__.py")
    assert command_line([bench, "decode", "--out", os.path.join(ROOT, "runs", "x")]) == \
        "duollm bench decode --out runs/x"
    assert command_line([top, "study", "--data", "a b.txt"]) == "duollm study --data 'a b.txt'"
    line = command_line([top, "bench", "hf", "--out", os.path.join(sys.prefix, "r")])
    assert line == "duollm bench hf --out <venv>/r"
    assert not MACHINE_PATH.findall(scrub_paths(os.path.join(ROOT, "benchmarks")))
