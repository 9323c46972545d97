"""torch.compile of the model parts, with static shapes; and the check of the perf.compile_* settings.

Each part says what it compiles through its `compile()`: nn.Module's compiles the whole forward in place,
FCOSLite only its dense network (its losses see a different number of boxes in every image), ActorCritic its
two networks (PPO calls them, never `forward`). Shapes are static (`dynamic=False`): each input shape is
compiled once, and the data keeps the shapes few (training loaders drop the last, smaller batch; QA pads to
data.max_length when compiled), so no step after warm-up compiles again and CUDA graphs can replay them.
"""

import difflib

from torch import nn

from trainer.errors import UserError


def check_compile(backend: str, mode: str | None) -> None:
    """Refuses, before the run, a backend this torch does not have (torch's own error is a traceback) and an
    inductor mode for another backend (which would ignore it)."""
    from torch._dynamo import list_backends  # (1 s to import: only when compiling)

    backends = list_backends(exclude_tags=())
    if backend not in backends:
        close = difflib.get_close_matches(backend, backends, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(
            f"perf.compile_backend={backend} is not a torch.compile backend here: {hint}use inductor, "
            "aot_eager or another of torch._dynamo.list_backends(exclude_tags=())"
        )
    if mode not in (None, "default") and backend != "inductor":
        raise UserError(
            f"perf.compile_mode={mode} is a mode of the inductor backend, not of {backend}: "
            "set perf.compile_backend=inductor or perf.compile_mode=null"
        )


def compile_parts(module: nn.Module, backend: str, mode: str | None) -> None:
    """Compiles each child of the task in place (parameter names, and so checkpoints, stay the same), as the
    child's own `compile()` chooses."""
    for part in module.children():
        part.compile(backend=backend, mode=mode, dynamic=False)
