"""Execute notebooks and store their outputs (`make notebooks`), and check that stored outputs are current.

    python tools/nbrun.py run   [NB ...] [--workers N]   # execute, clean, stamp (default: every notebook in nbs/)
    python tools/nbrun.py check [NB ...]                 # fail, naming each notebook whose outputs are stale

`run` executes a notebook top to bottom in a fresh Jupyter kernel (working directory `nbs/`), skipping the cells
that `nbdev_test` skips (cells flagged with a `tst_flags` flag such as `#| slow` or `#| cuda`, `#| eval: false`,
the `nbdev_export()` cell, notebooks with `skip_exec` frontmatter). It writes the notebook only when every cell
ran, cleaned as `nbdev_clean` would clean it, with a stamp in the notebook metadata: the SHA-256 of the code
cells' sources and the SHA-256 of their outputs. `check` recomputes both, so it fails when a notebook's code
changed after its outputs were stored, when outputs were edited or cleared by hand, or when a notebook was
never run by `run`. `check` reads JSON only (no kernel, no torch), so it takes well under a second.
"""
import argparse, hashlib, json, os, re, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
KEY = 'videolights_outputs'                      # notebook metadata key of the stamp (listed in settings.ini)
FIX = 'make notebooks NB={nb}'


def notebooks(paths=None)->list:
    "The notebooks named in `paths` (files or folders), or every notebook in nbs/ except `_*` scratch ones."
    paths = paths or [NBS]
    out = []
    for p in map(Path, paths):
        if p.is_dir(): out += sorted(q for q in p.glob('*.ipynb') if not q.name.startswith('_'))
        elif p.suffix == '.ipynb' and p.exists(): out.append(p)
        else: sys.exit(f'nbrun: {p}: no such notebook')
    return out


def _src(cell)->str:
    s = cell.get('source', '')
    return ''.join(s) if isinstance(s, list) else s


def stamp(nb:dict)->dict:
    "SHA-256 of the code cells' sources and of their outputs, as stored in the file."
    code = [c for c in nb['cells'] if c['cell_type'] == 'code']
    h = lambda o: hashlib.sha256(json.dumps(o, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return {'code_sha256': h([_src(c) for c in code]), 'outputs_sha256': h([c.get('outputs', []) for c in code])}


def _rel(p:Path)->str:
    p = Path(p).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def problem(path:Path)->str|None:
    "Why the stored outputs of the notebook at `path` are not current, or None when they are."
    try: nb = json.loads(Path(path).read_text(encoding='utf-8'))
    except json.JSONDecodeError as e: return f'not valid JSON (line {e.lineno}: {e.msg}; an unresolved merge?)'
    st = nb.get('metadata', {}).get(KEY)
    if not st: return 'outputs were never stored by `make notebooks`'
    now = stamp(nb)
    if st.get('code_sha256') != now['code_sha256']: return 'code changed after its outputs were stored'
    if st.get('outputs_sha256') != now['outputs_sha256']: return 'outputs were edited or cleared by hand'
    return None


def check(paths=None)->int:
    "Print one line per stale notebook with the command that fixes it; return the number of stale notebooks."
    bad = [(p, why) for p in notebooks(paths) if (why := problem(p))]
    for p, why in bad: print(f'STALE {_rel(p)}: {why}; run `{FIX.format(nb=_rel(p))}`', file=sys.stderr)
    if bad:
        print(f'{len(bad)} notebook(s) with stale outputs; `make notebooks` re-executes all of them', file=sys.stderr)
    else: print(f'ok: stored outputs of {len(notebooks(paths))} notebooks are current')
    return len(bad)


def _skipped(path:Path)->tuple[bool, list]:
    "Whether `nbdev_test` skips the whole notebook, and for each cell whether it skips that cell."
    from nbdev.config import get_config
    from nbdev.process import NBProcessor, extract_directives
    from nbdev.frontmatter import FrontmatterProc
    from execnb.nbio import read_nb
    from fastcore.basics import str2bool
    fm = getattr(NBProcessor(path, procs=FrontmatterProc, process=True).nb, 'frontmatter_', {})
    flags = set(get_config().tst_flags.split())
    def skip(cell):
        if cell.cell_type != 'code': return True
        if 'nbdev_export' + '(' in cell.source: return True
        d = extract_directives(cell, remove=False)
        return d.get('eval:', [''])[0].lower() == 'false' or bool(flags & d.keys())
    return str2bool(fm.get('skip_exec', False)), [skip(c) for c in read_nb(path).cells]


# Run by the kernel before the first cell (an IPython startup file, not stored in the notebook): temporary
# file and folder names come from a seeded generator, so printed paths are the same on every run.
_STARTUP = """import os as _os, random as _random, tempfile as _tempfile
_seq = _tempfile._get_candidate_names()
_seq._rng, _seq._rng_pid = _random.Random(0), _os.getpid()
del _os, _random, _tempfile, _seq
"""


def _kernel_env(tmp:Path)->dict:
    "Environment of the kernel: one thread, fixed hash seed, inline figures, private temp folder and IPython dir."
    (tmp/'ipython/profile_default/startup').mkdir(parents=True)
    (tmp/'ipython/profile_default/startup/00-nbrun.py').write_text(_STARTUP)
    (tmp/'tmp').mkdir()
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONHASHSEED='0', IPYTHONDIR=str(tmp/'ipython'),
               TMPDIR=str(tmp/'tmp'))
    env.pop('MPLBACKEND', None)                       # let ipykernel choose the inline backend (figures as PNG)
    return env


_WIDGET = 'application/vnd.jupyter.widget-view+json'
_TQDM = re.compile(r'^[^\n]*\d+%\|.*\| *\d+/\d+ \[')   # a tqdm bar's text form: "desc:  40%|####  | 2/5 ["
_TEXT = ('text/plain', 'text/html', 'text/markdown', 'text/latex', 'application/javascript')


def normalise(outputs:list, tmp:str)->list:
    """Outputs made comparable between runs: the kernel's private temp folder printed as `$TMPDIR` (no machine's
    path in a stored output), its process id dropped from `ipykernel_<pid>` paths, profiler chatter (`USDT:` lines)
    dropped, and widgets (whose state lives only in a running kernel) replaced by their text form; tqdm bars, which
    vanish when done, are dropped."""
    def fix(s:str)->str:
        s = re.sub(r'ipykernel_\d+', 'ipykernel_0', s.replace(tmp, '$TMPDIR'))
        return ''.join(l for l in s.splitlines(keepends=True) if not l.startswith('USDT:'))
    out = []
    for o in outputs:
        if 'text' in o:
            o['text'] = fix(''.join(o['text']) if isinstance(o['text'], list) else o['text'])
            if not o['text']: continue
        d = o.get('data', {})
        if _WIDGET in d:
            del d[_WIDGET]
            if _TQDM.match(''.join(d.get('text/plain', ''))) or not d: continue
        for k in d:
            if k in _TEXT: d[k] = fix(''.join(d[k]) if isinstance(d[k], list) else d[k])
        out.append(o)
    return out


def run_one(path:Path, timeout:int=900, verbose:bool=False)->str:
    "Execute the notebook at `path`, then write it cleaned and stamped; raise if a cell fails."
    import nbformat
    from nbclient import NotebookClient
    from jupyter_client import KernelManager
    from nbclient.exceptions import CellExecutionError
    from execnb.nbio import read_nb, write_nb, nb2str
    from nbdev.clean import _nbdev_clean
    path = Path(path).resolve()
    skip_nb, skips = _skipped(path)
    nb = nbformat.read(path, as_version=4)
    for c in nb.cells:
        if c.cell_type == 'code': c.outputs, c.execution_count = [], None
    if not skip_nb:
        with tempfile.TemporaryDirectory(prefix='nbrun-') as tmp:
            # the kernel talks over Unix sockets in the private folder: no TCP port to collide with other kernels
            km = KernelManager(kernel_name='python3', transport='ipc', ip=str(Path(tmp)/'kernel'))
            client = NotebookClient(nb, km=km, timeout=timeout, allow_errors=False,
                                    resources={'metadata': {'path': str(path.parent)}})
            try:
                with client.setup_kernel(env=_kernel_env(Path(tmp))):
                    for i, (c, sk) in enumerate(zip(nb.cells, skips)):
                        if sk: continue
                        t0 = time.time()
                        client.execute_cell(c, i)
                        if verbose: print(f'{_rel(path)} cell {i}: {time.time() - t0:.1f} s', flush=True)
            except CellExecutionError as e:
                raise RuntimeError(f'{_rel(path)}: a cell failed; the notebook was left unchanged\n{e}') from None
            finally:
                if km.has_kernel: km.shutdown_kernel(now=True)
            for c in nb.cells:
                if c.cell_type == 'code': c.outputs = normalise(c.outputs, str(Path(tmp)/'tmp'))
        nb.metadata.pop('widgets', None)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)/path.name
        nbformat.write(nb, tmp)
        out = read_nb(tmp)
    _nbdev_clean(out)
    out.metadata.pop(KEY, None)
    out.metadata[KEY] = stamp(json.loads(nb2str(out)))
    write_nb(out, path)
    if problem(path): raise RuntimeError(f'{_rel(path)}: stamp does not verify after writing')
    return _rel(path)


def _run_child(path:Path, verbose:bool)->tuple:
    "Run one notebook in a fresh Python process (no state shared between notebooks); (path, exit status, log)."
    cmd = [sys.executable, __file__, 'run-one', str(path), *(['--verbose'] if verbose else [])]
    r = subprocess.run(cmd, capture_output=True, text=True)
    log = '\n'.join(l for l in (r.stdout + r.stderr).splitlines() if 'without encryption' not in l)
    return path, r.returncode, log


def run(paths=None, workers:int=1, verbose:bool=False)->int:
    "Execute every notebook in `paths`, `workers` at a time, each in its own process; return how many failed."
    nbs, failed = notebooks(paths), 0
    with ThreadPoolExecutor(max(1, min(workers, len(nbs)))) as ex:
        for p, rc, log in ex.map(lambda p: _run_child(p, verbose), nbs):
            if log: print(log, file=sys.stderr if rc else sys.stdout, flush=True)
            failed += rc != 0
    print(f'{len(nbs) - failed} notebooks executed, {failed} failed')
    return failed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('cmd', choices=['run', 'check', 'run-one'])
    ap.add_argument('nbs', nargs='*', help='notebooks or folders (default: nbs/)')
    ap.add_argument('--workers', type=int, default=1, help='notebooks executed at once (run only)')
    ap.add_argument('--verbose', action='store_true', help='print the time of every cell (run only)')
    a = ap.parse_intermixed_args(argv)
    if a.cmd == 'run-one':
        try: print(f'stored outputs: {run_one(a.nbs[0], verbose=a.verbose)}')
        except RuntimeError as e: sys.exit(f'FAILED {e}')
        return
    n = run(a.nbs, a.workers, a.verbose) if a.cmd == 'run' else check(a.nbs)
    sys.exit(1 if n else 0)


if __name__ == '__main__': main()
