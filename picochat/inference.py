"""Opening a run dir for inference: what every command that uses a model (sample, chat, serve, the
evals, the speedrun's) does first. Which model and how it is a nested config, LoadOptions."""

from __future__ import annotations

from dataclasses import dataclass

from .common import DEVICE_HELP, DTYPE_HELP, DTYPES, choose_device, choose_dtype, set_threads
from .run_dir import RunDir, load_run
from .settings import setting


@dataclass
class LoadOptions:
    """Which model a command uses, and how: nested in the config of every command that loads one."""
    load: str = setting(help="run dir")
    device: str = setting("auto", DEVICE_HELP)
    dtype: str = setting("auto", DTYPE_HELP, choices=DTYPES)
    int8: bool = setting(False, "quantize the weights to INT8 at load time (see picochat quantize)")


def open_for_inference(opts: LoadOptions) -> RunDir:
    """Every core, the device, the run dir loaded onto it (INT8 if asked), in eval mode, and the
    compute dtype for it."""
    set_threads()
    device = choose_device(opts.device)
    run = load_run(opts.load, device, int8=opts.int8)
    run.model.eval()
    run.dtype = choose_dtype(opts.dtype, device)
    run.decode_dtype = choose_dtype(opts.dtype, device, decode=True)
    return run
