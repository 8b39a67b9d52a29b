"""``duollm export PATH --which big|small --out DIR`` (issue 15): a plain transformers
checkpoint of a DuoLLM run or step folder, a converted folder and a train --hf run, whose
logits are the model's under that policy. Its refusals are in tests/test_cli_errors.py."""
import json
import os

import hf_models as H
import pytest
import torch

from duollm import DuoConfig, DuoLLM, cli
from duollm.checkpoint import save_checkpoint

hf = pytest.importorskip("duollm.hf")
transformers = pytest.importorskip("transformers")


def _duo(seed):
    config = DuoConfig(n_layers=2, d_model=48, n_heads=3, vocab_size=61, d_big=100, d_small=20,
                       max_seq_len=64, rope_theta=500.0, norm_eps=1e-6)
    torch.manual_seed(seed)
    model = DuoLLM(config).eval()
    with torch.no_grad():  # larger weights than the init, so every part moves the logits
        for p in model.parameters():
            p.mul_(3.0)
    return model


def _export(capsys, *argv):
    assert cli.main(["export", *map(str, argv)]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("which", ["big", "small"])
def test_export_of_a_duollm_run_takes_its_newest_step(tmp_path, capsys, which):
    old, new = _duo(0), _duo(1)
    save_checkpoint(tmp_path / "run" / "step_0000010", old, step=10)
    save_checkpoint(tmp_path / "run" / "step_0000020", new, step=20)
    out = _export(capsys, tmp_path / "run", "--which", which, "--out", tmp_path / "x")
    assert "step_0000020" in out and f"all-{which}" in out and "LlamaForCausalLM" in out
    llama = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "x").eval()
    assert llama.config.intermediate_size == (100 if which == "big" else 20)
    t = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want, other = llama(t).logits, new(t, which), old(t, which)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - other).abs().max() > 1e-2  # the newest step, not another
    # a step folder directly gives the same files
    _export(capsys, tmp_path / "run" / "step_0000020", "--which", which, "--out",
            tmp_path / "y")
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "y" / name).read_bytes()


def _converted():
    model = hf.convert(H.qwen3(), 16, init="random")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.small.gate_proj.weight.add_(0.3)
    return model


def _routed_logits(model, which):
    with torch.no_grad(), hf.routing(model, which):
        return model(H.tokens()).logits


@pytest.mark.parametrize("which", ["big", "small"])
def test_export_of_a_converted_folder_is_a_plain_checkpoint_of_its_class(tmp_path, capsys,
                                                                         which):
    model = _converted()
    hf.save_converted(model, tmp_path / "conv")
    out = _export(capsys, tmp_path / "conv", "--which", which, "--out", tmp_path / "x")
    assert "Qwen3ForCausalLM" in out
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "x").eval()
    assert type(plain) is type(model) and not hf.is_converted(plain)
    assert plain.config.intermediate_size == (H.D_FF if which == "big" else 16)
    with torch.no_grad():
        got = plain(H.tokens()).logits
    assert torch.equal(got, _routed_logits(model, which))


def test_export_of_a_train_hf_run_takes_the_newest_steps_model(tmp_path, capsys):
    from duollm.hf.train import save_stage1, small_modules
    from duollm.train import TrainConfig

    run = tmp_path / "run"
    cfg = TrainConfig(out_dir=str(run))
    early, late = _converted(), _converted()
    with torch.no_grad():
        late.model.layers[0].mlp.small.up_proj.weight.add_(1.0)
    for step, model in ((3, early), (6, late)):
        save_stage1(str(run), model, small_modules(model), None, step, torch.Generator(), cfg,
                    0.0, [], "data")
    assert json.loads((run / "step_0000006" / "meta.json").read_text())["model"] == "model"
    out = _export(capsys, run, "--which", "small", "--out", tmp_path / "x")
    assert os.path.join("step_0000006", "model") in out
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "x").eval()
    with torch.no_grad():
        got = plain(H.tokens()).logits
    assert torch.equal(got, _routed_logits(late, "small"))
    assert not torch.equal(got, _routed_logits(early, "small"))


def test_duollm_export_runs_as_a_program_from_the_checkout(tmp_path):
    """python -m duollm export from the checkout root (where kernels/ must not shadow the
    installed distribution transformers imports): exit 0 and a loadable checkpoint."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hf.save_converted(_converted(), tmp_path / "conv")
    proc = subprocess.run([sys.executable, "-m", "duollm", "export", str(tmp_path / "conv"),
                           "--which", "small", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "all-small" in proc.stdout and "Traceback" not in proc.stderr
    config = transformers.AutoConfig.from_pretrained(tmp_path / "x")
    assert config.intermediate_size == 16 and config.architectures == ["Qwen3ForCausalLM"]
