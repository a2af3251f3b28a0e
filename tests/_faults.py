"""Fault injection for tests/test_reliability.py: writes under a folder fail as a full disk or a denied permission
would.

`install(folder, errno)` patches `open` (builtins and io) and `h5py.File` so that opening any file under `folder` for
writing raises `OSError(errno, ...)` naming the file, as the kernel does for a full disk (ENOSPC) or a folder without
write permission (EACCES).

`install(folder, errno, after=N)` lets the files open and fails later, as a disk that fills up while a file is written:
once N bytes in all have been written under `folder` (the bytes up to the limit are written), the next write raises;
an HDF5 file there fails when its second dataset is created. With errno 0 the process kills itself with SIGKILL at
that moment instead (a `kill -9` in the middle of a write).

`python tests/_faults.py FOLDER ERRNO [AFTER] -- ARGS...` runs `videolights ARGS` with the fault.
"""
import builtins, io, os, signal, sys
from pathlib import Path


def _under(folder, name)->bool:
    p = os.path.realpath(os.fsdecode(name))
    return p == folder or p.startswith(folder + os.sep)


def _fail(err, name):
    if err == 0: os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(err, os.strerror(err), os.fsdecode(name))


class _Filling:
    "A file object whose writes stop once the shared budget `left[0]` (bytes or characters) is spent."
    def __init__(self, f, left, err, name): self._f, self._left, self._err, self._name = f, left, err, name
    def write(self, b):
        if len(b) > self._left[0]:
            self._f.write(b[:self._left[0]])
            self._f.flush()
            self._left[0] = 0
            _fail(self._err, self._name)
        self._left[0] -= len(b)
        return self._f.write(b)
    def __getattr__(self, k): return getattr(self._f, k)
    def __iter__(self): return iter(self._f)
    def __enter__(self): return self
    def __exit__(self, *a): return self._f.__exit__(*a)


def install(folder, err:int, after:int|None=None):
    folder = os.path.realpath(folder)
    real_open, left = builtins.open, [after]

    def faulty_open(file, mode='r', *args, **kw):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in 'wax+') and _under(folder, file):
            if after is None: _fail(err, file)
            return _Filling(real_open(file, mode, *args, **kw), left, err, file)
        return real_open(file, mode, *args, **kw)

    import h5py                      # HDF5 opens and writes its files in C: refuse a writable h5py.File there too
    real_init, real_create = h5py.File.__init__, h5py.Group.create_dataset
    made = [0]

    def faulty_init(self, name, mode='r', *args, **kw):
        if isinstance(name, (str, os.PathLike)) and mode != 'r' and _under(folder, name) and after is None:
            _fail(err, os.fspath(name))
        return real_init(self, name, mode, *args, **kw)

    def faulty_create(self, *args, **kw):
        if after is not None and _under(folder, self.file.filename):
            made[0] += 1
            if made[0] > 1: _fail(err, self.file.filename)
        return real_create(self, *args, **kw)

    builtins.open = io.open = faulty_open
    h5py.File.__init__, h5py.Group.create_dataset = faulty_init, faulty_create
    return real_open, real_init, real_create


def uninstall(real):
    import h5py
    builtins.open = io.open = real[0]
    h5py.File.__init__, h5py.Group.create_dataset = real[1], real[2]


if __name__ == '__main__':
    sep = sys.argv.index('--')
    folder, err, *after = sys.argv[1:sep]
    install(folder, int(err), int(after[0]) if after else None)
    from videolights.cli import main
    sys.exit(main(sys.argv[sep + 1:]))
