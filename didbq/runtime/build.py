"""Build didbq's C kernels on first use into a cache folder and load them with ctypes.

No torch headers and no torch at build time (a torch build requirement would pull a CUDA wheel): one C file,
`cc -O3 -shared`, about a second, cached by the hash of the source, the compiler and the flags. A missing or
failing compiler is not an error here: `kernels()` returns None and `unavailable_reason()` says why, and the
loader falls back to the float path.

Environment: `CC` picks the compiler (default `cc`), `DIDBQ_CACHE` the cache folder (default
`$XDG_CACHE_HOME/didbq` or `~/.cache/didbq`), `DIDBQ_KERNEL` forces a code path (avx512, avx2, portable).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from didbq.errors import DidbqError

SOURCE = Path(__file__).with_name("kernels.c")
ISAS = ("portable", "avx2", "avx512")  # the C code's isa numbers are the positions
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off")
OPENMP = ("-fopenmp",)
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "didbq_best_isa": ((), _INT),
    "didbq_has_openmp": ((), _INT),
    "didbq_pack_rows": ((_P, _P, _I64, _I64, _P, _INT, _INT), None),
    "didbq_binary_linear": ((_P, _P, _I64, _I64, _P, _I64, _P, _P, _P, _INT, _INT), None),
    "didbq_binary_attention": ((_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, ctypes.c_float, _INT,
                                _P, _INT, _P, _P, _INT, _INT), None),
}


@dataclass(frozen=True)
class Kernels:
    """The loaded library, the best code path this CPU runs, the path in use and whether it threads."""

    library: ctypes.CDLL
    best: str
    selected: str
    openmp: bool
    path: Path

    def isa_number(self, isa: str | None = None) -> int:
        """The C code's number of `isa` (default: the selected path); refuses a path this CPU cannot run."""
        isa = isa or self.selected
        if isa not in ISAS:
            raise DidbqError(f"unknown kernel {isa!r}; use one of {', '.join(ISAS)}")
        if ISAS.index(isa) > ISAS.index(self.best):
            raise DidbqError(f"this CPU cannot run the {isa} kernel (best: {self.best}); use {self.best} or below")
        return ISAS.index(isa)


_state: dict[str, Kernels | str | None] = {"kernels": None, "reason": None}


def cache_folder() -> Path:
    root = os.environ.get("DIDBQ_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "didbq"
    return Path(root) / "kernels"


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def _library_path(compiler: list[str]) -> Path:
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *compiler, *FLAGS, platform.machine()]).encode())
    return cache_folder() / f"didbq-kernels-{key.hexdigest()[:16]}.so"


def _compile(compiler: list[str], target: Path) -> None:
    """Compile with OpenMP, else without (one thread); written under a temporary name, renamed when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
    os.close(handle)
    problem = ""
    try:
        for extra in (OPENMP, ()):
            command = [*compiler, *FLAGS, *extra, "-o", temporary, str(SOURCE), "-lm"]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as error:
                raise DidbqError(f"the C compiler {compiler[0]!r} could not run ({error}); set CC to a C compiler "
                                 f"(gcc or clang)") from None
            if done.returncode == 0:
                os.replace(temporary, target)
                return
            problem = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise DidbqError(f"compiling {SOURCE.name} with {compiler[0]!r} failed: {problem}")
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _open(path: Path) -> Kernels:
    library = ctypes.CDLL(str(path))
    for name, (arguments, result) in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, result
    best = ISAS[library.didbq_best_isa()]
    forced = os.environ.get("DIDBQ_KERNEL", "").strip().lower() or None
    kernels = Kernels(library, best, best, bool(library.didbq_has_openmp()), path)
    if forced is not None:
        kernels.isa_number(forced)  # refuses an unknown or unsupported path with one line
        kernels = Kernels(library, best, forced, kernels.openmp, path)
    return kernels


def kernels() -> Kernels | None:
    """The kernels, built on first use; None when they cannot be built here (see unavailable_reason)."""
    if _state["kernels"] is None and _state["reason"] is None:
        try:
            compiler = _compiler()
            path = _library_path(compiler)
            if not path.exists():
                _compile(compiler, path)
            _state["kernels"] = _open(path)
        except (DidbqError, OSError) as error:
            _state["reason"] = str(error)
    return _state["kernels"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used (None when they can)."""
    kernels()
    return _state["reason"]  # type: ignore[return-value]


def require_kernels() -> Kernels:
    """The kernels, or a one-line error saying why they are not available."""
    loaded = kernels()
    if loaded is None:
        raise DidbqError(f"the packed runtime is not available: {unavailable_reason()}")
    return loaded
