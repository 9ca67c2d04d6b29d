"""A model from the user's own file: ``--model path/to/file.py:function``.

The function takes ``input_shape`` (a sample's shape, without the batch axis) and
``num_outputs`` (plus the keyword arguments of ``--model-args``) and returns an ``nn.Module``
mapping a batch (n, *input_shape) to (n, num_outputs). The model keeps its own
initialisation, drawn under ``--init-seed``: PyTorch's global generator is seeded with it just
before the call and restored after. Every problem with the file (it does not import, has no
such function, a signature that does not take these arguments, a result that is not a module
or gives outputs of another shape) is one UserError line naming the file and the problem.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys

import torch

from utils.errors import UserError
from utils.user_files import model_file_parts

_CHECK_ROWS = 2  # inputs of the forward pass that checks the output shape


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_model_function(spec: str):
    """The function named by ``path/to/file.py:function``, its module imported from the file
    (with the file's folder first on ``sys.path`` while it imports, for its own helpers)."""
    path, function = model_file_parts(spec)
    name = f"eoss_model_file_{abs(hash(os.path.abspath(path)))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None:
        raise UserError(f"--model {spec}: {path} cannot be imported as a Python file; pass path/to/file.py:function")
    module = importlib.util.module_from_spec(module_spec)
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 -- the user's code may fail in any way
        raise UserError(f"--model {spec}: importing {path} failed ({_one_line(exc)}); fix the file") from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    builder = getattr(module, function, None)
    if not callable(builder):
        found = "is not a function" if hasattr(module, function) else "is not defined there"
        raise UserError(f"--model {spec}: {function} {found}; name a function of {path} that returns the model")
    return builder


def build_user_model(spec: str, input_shape, num_outputs: int, *, model_args: dict | None, init_seed: int,
                     sample: torch.Tensor) -> torch.nn.Module:
    """Call the file's function under ``init_seed`` and check that the module it returns maps
    the first rows of ``sample`` to (rows, ``num_outputs``)."""
    function = model_file_parts(spec)[1]
    builder = load_model_function(spec)
    arguments = dict(model_args or {})
    input_shape = tuple(int(s) for s in input_shape)
    try:
        inspect.signature(builder).bind(input_shape, num_outputs, **arguments)
    except TypeError as exc:
        given = ", ".join(["input_shape", "num_outputs", *arguments])
        raise UserError(f"--model {spec}: {function} cannot be called as {function}({given}) ({exc}); "
                        f"make it take input_shape and num_outputs{' and the --model-args keys' if arguments else ''}") from None
    except ValueError:
        pass  # a builtin without a signature: the call below says whether it fits
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            model = builder(input_shape, num_outputs, **arguments)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 -- the user's code may fail in any way
            raise UserError(f"--model {spec}: {function}(input_shape={input_shape}, num_outputs={num_outputs}) failed "
                            f"({_one_line(exc)}); fix the function") from None
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"--model {spec}: {function} returned a {type(model).__name__}, not a torch.nn.Module; return the network")
    _check_outputs(spec, model, sample[:_CHECK_ROWS], num_outputs)
    return model


@torch.no_grad()
def _check_outputs(spec: str, model: torch.nn.Module, x: torch.Tensor, num_outputs: int) -> None:
    """One forward pass in eval mode (BatchNorm statistics stay untouched; the mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        out = model(x.to(next(model.parameters(), x).device))
    except Exception as exc:  # noqa: BLE001 -- the user's forward may fail in any way
        raise UserError(f"--model {spec}: the model fails on a batch of inputs of shape {tuple(x.shape)} "
                        f"({_one_line(exc)}); fix its forward") from None
    finally:
        model.train(was_training)
    expected = (x.shape[0], num_outputs)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"--model {spec}: the model maps inputs of shape {tuple(x.shape)} to {got}, not {expected}; "
                        f"make it return (batch, num_outputs)")
