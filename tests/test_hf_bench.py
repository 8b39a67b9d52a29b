"""``duollm bench hf``: a quick run writes typed rows for every candidate; bad options exit 2."""
import glob
import json

import pytest
import torch

pytest.importorskip("transformers", reason="duollm bench hf needs transformers")

from duollm.bench.hf_bench import HFBenchRow, ThresholdRouter, rows_of  # noqa: E402
from duollm.cli import main  # noqa: E402
from duollm.reference import BIG  # noqa: E402


def test_quick_run_writes_every_candidate(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "hf", "--quick", "--repeats", "1", "--budget", "0.01", "--no-plots",
                 "--out", str(out)]) == 0
    (path,) = glob.glob(str(out / "hf-*.json"))
    with open(path) as f:
        data = json.load(f)
    assert data["env"]["kind"] == "hf" and data["env"]["d_small"] < data["env"]["d_big"]
    rows = rows_of(data["rows"])
    assert all(isinstance(r, HFBenchRow) for r in rows)
    impls = {"original", "ideal", "converted", "big", "small", "1/12"}
    for phase in ("prefill", "decode"):
        got = {r.impl: r for r in rows if r.phase == phase}
        assert set(got) == impls and not any(r.error for r in got.values())
        assert all(r.tokens_per_s > 0 and r.repeats >= 1 for r in got.values())
        assert got["original"].vs_original == 1.0
        assert 0 < got["1/12"].big_fraction < 0.5
    assert glob.glob(str(out / "hf-*.csv"))


def test_threshold_router_sends_about_the_share_big():
    torch.manual_seed(0)
    router = ThresholdRouter(2, 16, 1 / 12, seed=0, device=torch.device("cpu"),
                             dtype=torch.float32)
    hidden = torch.randn(4, 240, 16)
    fitted = []
    router.fit(lambda: fitted.append(router(0, hidden)))
    assert torch.equal(fitted[0], torch.ones(4, 240, dtype=torch.int64))  # small while fitting
    assert router.n == 0
    routes = router(0, hidden)
    assert routes.shape == (4, 240)
    assert abs(router.fraction() - 1 / 12) < 0.01
    assert int((routes == BIG).sum()) == int(router.n_big)


@pytest.mark.parametrize("argv, option", [
    (["--d-big", "64", "--d-small", "64"], "--d-small"),
    (["--phases", "train"], "--phases"),
    (["--repeats", "0"], "--repeats"),
])
def test_bad_options_exit_2(tmp_path, capsys, argv, option):
    assert main(["bench", "hf", "--quick", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert option in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bench_hf_path_measures_the_users_checkpoint_and_plots_it(tmp_path, capsys):
    """``bench hf PATH``: a train --hf run folder (its newest step's converted model) and a
    plain checkpoint (converted in the run): the rows describe that model, not a random one,
    and a PNG of tokens/s per candidate and phase is written beside the CSV/JSON."""
    import hf_models
    from duollm import hf

    plain = tmp_path / "plain"
    hf_models.llama(vocab_size=256).save_pretrained(plain)
    conv = hf.convert(hf_models.llama(vocab_size=256), 8)
    hf.save_converted(conv, tmp_path / "run" / "step_0000004" / "model")
    (tmp_path / "run" / "step_0000004" / "meta.json").write_text("{}")  # a complete step
    capsys.readouterr()
    for path, d_small in ((tmp_path / "run", 8), (plain, hf_models.D_FF // 16)):
        out = tmp_path / f"bench-{path.name}"
        assert main(["bench", "hf", str(path), "--quick", "--repeats", "1", "--budget", "0.01",
                     "--out", str(out)]) == 0
        (json_path,) = glob.glob(str(out / "hf-*.json"))
        with open(json_path) as f:
            data = json.load(f)
        env = data["env"]
        assert env["d_model"] == hf_models.D_MODEL and env["d_big"] == hf_models.D_FF
        assert env["n_layers"] == hf_models.N_LAYERS and env["vocab"] == 256
        assert env["d_small"] == d_small and env["family"] == "llama"
        assert env["checkpoint"].startswith(str(path))
        rows = rows_of(data["rows"])
        assert {r.impl for r in rows} == {"original", "ideal", "converted", "big", "small",
                                          "1/12"}
        assert not any(r.error for r in rows) and all(r.d_small == d_small for r in rows)
        (png,) = glob.glob(str(out / "hf-*.png"))
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert png in capsys.readouterr().out


def test_bench_hf_path_models_are_the_checkpoints_own(tmp_path):
    """What ``bench hf PATH`` times: for a converted folder, the original is its all-big model
    (the plain Llama it came from, exactly), the ideal its all-small model, the converted one
    the folder itself."""
    import hf_models
    from duollm import hf
    from duollm.bench.hf_bench import Source, load_source

    hf.save_converted(hf.convert(hf_models.llama(vocab_size=256), 8), tmp_path / "conv")
    src = Source(path=str(tmp_path / "conv"), config={}, converted=True, d_small=8)
    original, ideal, converted = load_source(src, torch.float32, torch.device("cpu"))
    assert not hf.is_converted(original) and not hf.is_converted(ideal)
    assert ideal.config.intermediate_size == 8 and original.config.intermediate_size == 88
    tokens = hf_models.tokens()
    with torch.no_grad():
        want = hf_models.llama(vocab_size=256)(input_ids=tokens).logits
        assert torch.equal(original(input_ids=tokens).logits, want)
        assert torch.equal(converted(input_ids=tokens).logits, want)
        with hf.routing(converted, "small"):
            small = converted(input_ids=tokens).logits
        torch.testing.assert_close(ideal(input_ids=tokens).logits, small, rtol=0, atol=1e-5)
