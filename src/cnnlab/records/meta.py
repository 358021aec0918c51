"""What a run records about where and how it ran: versions, git commit, device, threads, the command."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def cnnlab_version() -> str:
    try:
        return version("cnnlab")
    except PackageNotFoundError:      # a source checkout on PYTHONPATH, not installed
        return "unknown"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, argv: list[str] | None = None) -> dict:
    return {"cnnlab": cnnlab_version(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "git_commit": git_commit(),
            "command": list(argv if argv is not None else sys.argv), "cwd": os.getcwd(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), **slurm_task()}


def slurm_task() -> dict:
    """{'slurm': {...}} inside a Slurm job (which job, array task and node ran this run), else {}."""
    keys = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID",
            "node": "SLURMD_NODENAME", "partition": "SLURM_JOB_PARTITION", "cpus": "SLURM_CPUS_PER_TASK"}
    found = {k: os.environ[v] for k, v in keys.items() if os.environ.get(v)}
    return {"slurm": found} if "job_id" in found else {}
