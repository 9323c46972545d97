"""`trainer --help`: one screen of groups, options and examples; the composed config only for a given exp.
(`trainer --docs WORD` is trainer/cli/docs.py.)"""

from pathlib import Path

USAGE = "usage: trainer +exp=NAME [group=option ...] [key=value ...] [-v] [-m]"

ABOUT = (
    "Trains the experiment Hydra composes from conf/. Each run has a run dir (checkpoints, metrics.json,\n"
    "train.log, summary.txt); the same command with the same run dir resumes it."
)

EXAMPLES = (
    ("trainer +exp=dcgan", "on digits that ship with the package"),
    ("trainer +exp=dcgan data=image_folder data.root=DIR", "your own images"),
    ("trainer +exp=qa trainer=gpu", "on a GPU: bf16, TF32, channels_last"),
    ("trainer +exp=qa launcher=ray launcher.num_workers=4", "4 Ray workers"),
    ("trainer +exp=detector launcher=slurm slurm.gpus_per_node=8", "a SLURM batch job"),
    ("trainer -m +exp=dcgan hparams_search=dcgan_optuna", "an Optuna sweep"),
    ("trainer +exp=dcgan hydra.run.dir=runs/a", "the same again resumes it"),
)

OPTIONS = (
    ("--help", "this; with +exp=NAME also that experiment's composed config"),
    ("--cfg job", "print the composed config and run nothing"),
    ("-m, --multirun", "a sweep over comma lists or an hparams_search"),
    ("-v, --verbose", "every library's messages (the same as verbose=true)"),
    ("--version", "the package version"),
    ("--docs WORD", "the docs' sections that mention WORD (exit 1: none)"),
    ("-sc install=bash", 'tab completion: eval "$(trainer -sc install=bash)"'),
    ("--hydra-help", "Hydra's own options"),
)


def config_groups(roots: list[Path]) -> dict[str, list[str]]:
    """Each config group and its options; `hydra` and nested groups (an exp's search space) are
    internal."""
    groups: dict[str, set[str]] = {}
    for root in roots:
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "hydra"):
            options = {p.stem for p in folder.glob("*.yaml")}
            if options:
                groups.setdefault(folder.name, set()).update(options)
    return {name: sorted(options) for name, options in groups.items()}


def help_text(roots: list[Path], composed: str | None = None) -> str:
    groups = config_groups(roots)
    exps = groups.pop("exp", [])
    width = max(len(name) for name in groups)
    lines = [
        USAGE,
        "",
        ABOUT,
        "",
        f"experiments (+exp=NAME): {', '.join(exps)}",
        "",
        "config groups (group=option):",
    ]
    lines += [f"  {name:<{width}}  {', '.join(options)}" for name, options in sorted(groups.items())]
    lines += ["", "examples:"]
    wide = max(len(command) for command, _ in EXAMPLES)
    lines += [f"  {command:<{wide}}  {what}" for command, what in EXAMPLES]
    lines += ["", "options:"]
    lines += [f"  {flag:<17}  {what}" for flag, what in OPTIONS]
    lines += ["", "Any key of the composed config is set with key=value; trainer --docs WORD tells the rest."]
    if composed is not None:
        lines += ["", "composed config:", composed.rstrip()]
    return "\n".join(lines)
