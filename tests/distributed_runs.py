"""Launch a script's main() in several local processes joined by torch.distributed (Gloo), as torchrun does.

The processes are forked from the test process (no new Python start, no torch import), each
with torchrun's variables and one thread; each writes its stderr into ``rank<r>.err`` of a
folder and reports its exit code. ``actions`` make a rank misbehave right after it logs a
step: ``("sigterm", rank, step)`` sends it SIGTERM, ``("kill", rank, step)`` ends it at once,
``("hang", rank, step)`` stops answering for HANG_S seconds, then ends it.
"""

import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

import torch.multiprocessing as mp

import utils.training

# A killed rank ends its peers' next collective at once on Gloo; the timeout bounds everything else.
TEST_TIMEOUT_S = 30
HANG_S = 10


@dataclass
class Launch:
    exit_codes: list[int]
    stderr: list[str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _act_after(step_to_act: int, action: str):
    original = utils.training._Progress.update

    def update(self, step, *args, **kwargs):
        original(self, step, *args, **kwargs)
        if step == step_to_act:
            if action == "kill":
                os._exit(9)
            if action == "hang":
                time.sleep(HANG_S)
                os._exit(9)
            os.kill(os.getpid(), signal.SIGTERM)

    utils.training._Progress.update = update


def _worker(rank, size, port, main, argv, actions, err_dir, codes):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), EOSS_DIST_TIMEOUT=str(TEST_TIMEOUT_S))
    # The test's own capture replaces sys.stderr: both it and file descriptor 2 go to the rank's file.
    sys.stderr = open(os.path.join(err_dir, f"rank{rank}.err"), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), 2)
    for action, on_rank, step in actions:
        if on_rank == rank:
            _act_after(step, action)
    code = 1
    try:
        code = main(argv)
    finally:
        codes[rank] = code


def launch(main, argv, size: int, err_dir, actions=()) -> Launch:
    """Run ``main(argv)`` in ``size`` processes of one Gloo group; wait for all of them."""
    context = mp.get_context("fork")
    codes = context.Array("i", [-1] * size)
    port = _free_port()
    os.makedirs(err_dir, exist_ok=True)
    processes = [context.Process(target=_worker, args=(rank, size, port, main, list(argv), list(actions),
                                                         str(err_dir), codes)) for rank in range(size)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=4 * TEST_TIMEOUT_S)
        if p.is_alive():
            p.kill()
            p.join()
    exits = [codes[r] if codes[r] != -1 else p.exitcode for r, p in enumerate(processes)]
    stderr = [open(os.path.join(err_dir, f"rank{r}.err")).read() for r in range(size)]
    return Launch(exits, stderr)
