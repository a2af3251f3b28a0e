"""Fault injection for tests/test_reliability.py: writes under a folder fail as a full disk or a denied permission would.

`install(folder, errno)` patches `open` (builtins and io) and `h5py.File` so that opening any file under `folder` for writing raises
`OSError(errno, ...)` naming the file, as the kernel does for a full disk (ENOSPC) or a folder without write
permission (EACCES). `python tests/_faults.py FOLDER ERRNO -- ARGS...` runs `videolights ARGS` with the fault.
"""
import builtins, io, os, sys
from pathlib import Path


def install(folder, err:int):
    folder = os.path.realpath(folder)
    real_open = builtins.open

    def faulty_open(file, mode='r', *args, **kw):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in 'wax+'):
            p = os.path.realpath(os.fsdecode(file))
            if p == folder or p.startswith(folder + os.sep): raise OSError(err, os.strerror(err), os.fsdecode(file))
        return real_open(file, mode, *args, **kw)

    import h5py                      # HDF5 opens its files in C: refuse a writable h5py.File there too
    real_init = h5py.File.__init__

    def faulty_init(self, name, mode='r', *args, **kw):
        if isinstance(name, (str, os.PathLike)) and mode != 'r':
            p = os.path.realpath(os.fspath(name))
            if p == folder or p.startswith(folder + os.sep): raise OSError(err, os.strerror(err), os.fspath(name))
        return real_init(self, name, mode, *args, **kw)

    builtins.open = io.open = faulty_open
    h5py.File.__init__ = faulty_init
    return real_open, real_init


def uninstall(real):
    import h5py
    builtins.open = io.open = real[0]
    h5py.File.__init__ = real[1]


if __name__ == '__main__':
    folder, err, sep, *args = sys.argv[1:]
    assert sep == '--'
    install(folder, int(err))
    from videolights.cli import main
    sys.exit(main(args))
