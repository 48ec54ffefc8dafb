"""Which errors udaflow raised on purpose, with a message meant for the user (the CLI prints those as
one line), and which are bugs (they keep their traceback)."""

from __future__ import annotations

import dis
import errno
import linecache
import sys
from pathlib import Path


def raised_on_purpose(exc: BaseException) -> bool:
    """A `raise` statement in udaflow, flows or tasks: an error with a message meant for the user.

    The same types raised inside torch, numpy or a library (a shape mismatch, a KeyError from a
    lookup in our code) start nowhere near a `raise` of ours: they are bugs."""
    if isinstance(getattr(exc, "raised_on_purpose", None), bool):  # judged where it was raised (a bench worker process)
        return exc.raised_on_purpose
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    filename = Path(code.co_filename).resolve()
    roots = [Path(d).resolve() for name in ("udaflow", "flows", "tasks") if (m := sys.modules.get(name)) for d in getattr(m, "__path__", [])]
    if not any(filename.is_relative_to(root) for root in roots):
        return False
    # the instruction that raised: a `raise` statement compiles to RAISE_VARARGS (the source line, the
    # fallback, can be stale in linecache when the file changed on disk after it was read)
    if 0 <= tb.tb_lasti < len(code.co_code) and code.co_code[tb.tb_lasti] == dis.opmap["RAISE_VARARGS"]:
        return True
    linecache.checkcache(str(filename))
    return linecache.getline(str(filename), tb.tb_lineno).lstrip().startswith("raise ")


def judged_here(exc: BaseException) -> BaseException:
    """Record on `exc` whether it was raised on purpose while its traceback is still here: an error that
    crosses a process boundary (a bench worker's, re-raised by the parent) arrives without it."""
    exc.raised_on_purpose = raised_on_purpose(exc)
    return exc


def chain(exc: BaseException | None):
    """`exc`, then each error it was raised from or while handling (Prefect, GX and MLflow re-raise
    what they met)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def disk_full(exc: BaseException | None) -> OSError | None:
    """The OSError "no space left on device" (or "disk quota exceeded") in `exc`'s chain."""
    return next((e for e in chain(exc) if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)), None)
