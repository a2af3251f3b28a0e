"""Stored notebook outputs (tools/nbrun.py, `make notebooks`): every notebook in nbs/ carries outputs made by its
current code, the check catches edited code, hand-edited or missing outputs, and a run stores what the notebook
shows, skips flagged cells, keeps printed temporary paths stable and never writes a notebook whose cell failed."""
import copy, importlib.util, json, shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('nbrun', ROOT/'tools/nbrun.py')
nbrun = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nbrun)


def test_every_notebook_has_current_outputs(capsys):
    nbs = nbrun.notebooks()
    assert len(nbs) >= 17 and all(p.suffix == '.ipynb' and not p.name.startswith('_') for p in nbs)
    bad = {p.name: nbrun.problem(p) for p in nbs if nbrun.problem(p)}
    assert not bad, f'stale notebooks (run `make notebooks NB=...`): {bad}'
    for p in nbs:
        nb = json.loads(p.read_text())
        assert any(c.get('outputs') for c in nb['cells'] if c['cell_type'] == 'code'), f'{p.name} has no output'


def _save(nb, path):
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    return path


def test_check_names_stale_notebooks(tmp_path, capsys):
    src = json.loads((ROOT/'nbs/00_spans.ipynb').read_text())
    assert nbrun.problem(_save(src, tmp_path/'ok.ipynb')) is None
    code = [i for i, c in enumerate(src['cells']) if c['cell_type'] == 'code']
    edited = copy.deepcopy(src)
    edited['cells'][code[-2]]['source'] = ['1 + 1']
    assert 'code changed' in nbrun.problem(_save(edited, tmp_path/'edited.ipynb'))
    hand = copy.deepcopy(src)
    i = next(i for i in code if src['cells'][i]['outputs'])
    hand['cells'][i]['outputs'] = []
    assert 'edited or cleared' in nbrun.problem(_save(hand, tmp_path/'hand.ipynb'))
    bare = copy.deepcopy(src)
    for c in bare['cells']:
        if c['cell_type'] == 'code': c['outputs'] = []
    assert 'edited or cleared' in nbrun.problem(_save(bare, tmp_path/'bare.ipynb'))
    del bare['metadata'][nbrun.KEY]
    assert 'never stored' in nbrun.problem(_save(bare, tmp_path/'never.ipynb'))
    md = copy.deepcopy(src)                                     # prose edits do not make outputs stale
    md['cells'][1]['source'] = ['# A new title\n', 'and new words']
    assert nbrun.problem(_save(md, tmp_path/'prose.ipynb')) is None
    (tmp_path/'merge.ipynb').write_text((tmp_path/'ok.ipynb').read_text().replace('"cells": [',
            '"cells": [\n<<<<<<< HEAD', 1))
    assert 'not valid JSON (line 3' in nbrun.problem(tmp_path/'merge.ipynb')
    assert nbrun.check([tmp_path]) == 5
    err = capsys.readouterr().err
    for name in ('edited', 'hand', 'bare', 'never', 'merge'): assert f'{name}.ipynb' in err
    assert 'make notebooks NB=' in err and 'prose.ipynb' not in err and 'ok.ipynb' not in err


def _cell(src, kind='code'):
    c = {'cell_type': kind, 'id': f'c{abs(hash(src)) % 10**8:08d}', 'metadata': {}, 'source': src}
    if kind == 'code': c.update(outputs=[], execution_count=None)
    return c


def _toy_nb(path, extra=()):
    cells = [_cell('# Toy\n> a notebook for the runner', 'markdown'),
             _cell('import tempfile, warnings\nimport matplotlib.pyplot as plt'),
             _cell('d = tempfile.mkdtemp()\nprint(d)\nwarnings.warn("careful")'),
             _cell('fig, ax = plt.subplots(figsize=(2, 1))\nax.plot([0, 1], [1, 0]);'),
             _cell('#| slow\nraise RuntimeError("slow cells are not executed")'),
             _cell('#| eval: false\nraise RuntimeError("never run")'),
             _cell('6 * 7'), *extra]
    nb = {'cells': cells, 'metadata': {'kernelspec': {'display_name': 'python3', 'language': 'python',
                                                       'name': 'python3'}}, 'nbformat': 4, 'nbformat_minor': 5}
    return _save(nb, path)


def test_run_stores_outputs_and_stamp(tmp_path):
    p = _toy_nb(tmp_path/'toy.ipynb')
    nbrun.run_one(p)
    nb = json.loads(p.read_text())
    assert nbrun.problem(p) is None
    out = [c.get('outputs', []) for c in nb['cells']]
    txt = lambda o, name: ''.join(o['text']) if o.get('name') == name else ''
    printed = ''.join(txt(o, 'stdout') for o in out[2]).strip()
    assert printed.startswith('$TMPDIR/tmp') and len(printed) == len('$TMPDIR/tmp') + 8   # the private temp folder hidden
    assert 'ipykernel_0/' in ''.join(txt(o, 'stderr') for o in out[2])    # no kernel pid in warnings
    assert any('image/png' in o.get('data', {}) for o in out[3])
    assert out[4] == [] and out[5] == []                        # flagged cells stay empty
    assert ''.join(out[6][0]['data']['text/plain']) == '42'
    assert all(c.get('execution_count') is None for c in nb['cells'])
    first = p.read_text()
    nbrun.run_one(p)                                            # a rerun stores the same bytes
    assert p.read_text() == first


def test_failing_cell_leaves_notebook_unchanged(tmp_path):
    p = _toy_nb(tmp_path/'bad.ipynb', extra=[_cell('raise ValueError("broken lesson")')])
    before = p.read_text()
    with pytest.raises(RuntimeError, match='bad.ipynb: a cell failed'): nbrun.run_one(p)
    assert p.read_text() == before
