"""The study at scale, end to end at small scale (issue 17): ``duollm data prepare`` of the
standard library's text into byte shards, ``duollm train --fsdp`` on the shards under torchrun
with two gloo ranks, then ``duollm study --checkpoint`` on its output under torchrun with two
ranks, whose report numbers and ``verdicts.json`` equal one process's exactly (nothing is
trained in the study, so no float summation order differs)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from multiproc import torchrun  # noqa: E402

from duollm.cli import main  # noqa: E402

_MAIN = """
    import sys
    from duollm.cli import main
    sys.exit(main(sys.argv[1:]))
"""

STUDY = ["--quick", "--no-synthetic-check", "--n-random", "5", "--no-progress", "--threads",
         "1"]


def _numbers(res):
    """results.json without what differs between runs by design: timings, the out path."""
    res = json.loads(json.dumps(res))
    for key in ("timings", "name"):
        res.pop(key, None)
    for h in res["holdouts"]:
        for gap in h.get("approx_gaps") or []:
            gap.pop("seconds")  # the beam's and greedy's wall time
    return res


@pytest.mark.slow
def test_prepare_train_fsdp_and_study_checkpoint_under_two_ranks(tmp_path, capsys):
    from duollm.data import default_corpus_text

    text = tmp_path / "pydoc.txt"
    text.write_text(default_corpus_text(), encoding="utf-8")
    shards = tmp_path / "shards"
    assert main(["data", "prepare", "--input", str(text), "--out", str(shards),
                 "--shard-tokens", "100000", "--no-progress"]) == 0
    run = tmp_path / "run"
    (tmp_path / "a").mkdir()
    torchrun(_MAIN, tmp_path / "a", "train", "--data", str(shards), "--fsdp", "--steps", "4",
             "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--out", str(run),
             "--no-progress", "--threads", "1")
    assert (run / "step_0000004" / "meta.json").is_file()
    two, one = tmp_path / "two", tmp_path / "one"
    (tmp_path / "b").mkdir()
    torchrun(_MAIN, tmp_path / "b", "study", "--checkpoint", str(run), "--data", str(shards),
             "--out", str(two), *STUDY)
    assert main(["study", "--checkpoint", str(run), "--data", str(shards), "--out", str(one),
                 *STUDY]) == 0
    got = json.loads((two / "results.json").read_text())
    want = json.loads((one / "results.json").read_text())
    assert got["holdouts"][0]["name"] == "shards" and got["source"].startswith("checkpoint:")
    assert _numbers(got) == _numbers(want)
    assert (two / "verdicts.json").read_text() == (one / "verdicts.json").read_text()
