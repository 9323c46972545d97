"""What every benchmark prints: Markdown tables under a heading that says when and on what they were measured,
so that its output goes into docs/benchmarks.md as it is."""

import os
import platform
import time
from collections.abc import Iterable, Sequence


def machine() -> str:
    """The CPU model and its cores, the GPU if torch sees one, and torch's version."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu} ({os.cpu_count()} cores){gpu}, torch {torch.__version__}"


def heading(title: str) -> str:
    """`### <title> — measured <date> on <machine>`."""
    return f"\n### {title} — measured {time.strftime('%Y-%m-%d')} on {machine()}\n"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table; cells as given (format numbers before)."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)
