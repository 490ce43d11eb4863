"""The audit trail of a run: when, how (command line, options), with what (version, commit,
host, device) and on which data (sha256), as the certificate's ``run`` block records it."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import lipverify

PACKAGE_DIR = Path(lipverify.__file__).resolve().parent


def utc_timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed (program name shortened to ``lipverify``), shell-quoted."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name in ("lipverify", "__main__.py", "cli.py"):
        argv[0] = "lipverify"
    return shlex.join(argv)


def git_commit() -> dict | None:
    """``{"commit", "dirty"}`` when lipverify runs from a git checkout, else None."""
    root = PACKAGE_DIR.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"{cpu_name()} ({os.cpu_count()} logical cores)"


def run_record(device: str, options: dict, command: str | None) -> dict:
    """Everything about the run an auditor needs to reproduce it (see the README's JSON schema)."""
    return {
        "timestamp_utc": utc_timestamp(),
        "command": command if command is not None else command_line(),
        "lipverify_version": lipverify.__version__,
        "git": git_commit(),
        "host": platform.node(),
        "platform": platform.platform(),
        "device": device,
        "device_name": device_name(device),
        "options": options,
    }
