"""Launching test workers under ``torchrun`` (shared by the multi-process tests)."""
import os
import subprocess
import sys
import textwrap


def torchrun(script: str, tmp_path, *args: str, nproc: int = 2) -> None:
    """Run ``script`` (Python source) under ``torchrun --standalone`` with ``nproc`` ranks."""
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(script))
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(nproc), str(path), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
