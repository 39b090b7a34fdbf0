"""Process-wide workarounds for behaviour of the libraries below this project, kept in this one module.

Each says which upstream behaviour it works around and how to tell when it is gone. Nothing else in
llm/ changes process-wide state to hide a library's behaviour.
"""

import os
import sys


def silence_orbax_stragglers() -> None:
    """Orbax (0.11): when one array of a restore fails (a truncated file), its manager closes the
    asyncio event loop while the other reads are still in flight; as they land, or at exit, each prints
    'Exception ignored in ...' with an 'Event loop is closed' traceback about the failure already
    reported. Only those are dropped; every other unraisable exception still reaches the previous hook.

    Gone when: without this hook, tests/test_guard.py's truncated-checkpoint test prints no
    'Exception ignored' on stderr."""
    if getattr(sys.unraisablehook, "_llm_orbax", False):
        return
    previous = sys.unraisablehook

    def on_unraisable(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        orbax_coroutine = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
        if not (orbax_coroutine or closed_loop):
            previous(unraisable)

    on_unraisable._llm_orbax = True
    sys.unraisablehook = on_unraisable


def one_line_orbax_errors() -> None:
    """Orbax logs each failed background write at ERROR with its whole traceback, and a full disk fails
    dozens of them; the run reports the failure once itself (guard.WriteFailed), so each such record
    keeps its first line only. Installed by the CLI on absl's handler.

    Gone when: Orbax logs a failed write once, or without its traceback (a full-disk test's stderr shows it)."""
    from absl import logging

    def first_line(record) -> bool:
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
            record.msg, record.args = str(record.getMessage()).splitlines()[0][:300], None
            record.exc_info = record.exc_text = None
        return True

    logging.get_absl_handler().addFilter(first_line)


def tensorboardx_summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported with torch hidden: tensorboardX's writer imports torch at
    import time when it is installed (the hf extra) only to accept torch tensors, which costs every
    run's start 3-4 s and ~300 MB; scalars need none of it. (TensorBoard's own writer is no way out:
    with TensorFlow installed, as TFDS needs it, it imports all of TensorFlow, 10 s and more.)
    torch is hidden only while tensorboardX imports, and only if nothing has imported it yet.

    Gone when: `python -X importtime -c "import tensorboardX"` lists no torch."""
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # an import of torch now raises ImportError, which tensorboardX tolerates
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hidden:
            del sys.modules["torch"]
    return SummaryWriter


def exit_now(code: int) -> None:
    """Ends the process without its exit handlers, once a write into the workdir has failed: Orbax's
    atexit handler would only retry the writes that just failed, each with a traceback, and the
    committed checkpoints need nothing more. Standard streams are flushed first.

    Gone when: Orbax's exit handler gives up on a failed async save without raising again (the
    full-disk CLI test then exits with the same code through sys.exit and prints no traceback)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
