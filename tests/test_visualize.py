"""Tests of videolights.visualize beyond the notebook: the ablation table, the explorer driven through its widgets,
figure determinism, the ablate CLI, and (slow) the explorer rendered by a real headless browser."""
import io, json, os, shutil, subprocess, tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import torch

from videolights import visualize as viz
from videolights import experiments as exps
from videolights.errors import run_command

ROOT = Path(__file__).resolve().parents[1]
GT = ROOT/'data/qvhighlights/highlight_val_release.jsonl'
PREDS = ROOT/'data/qvhighlights/official_examples/sample_val_preds.jsonl'


def test_paper_ablations_table():
    df = viz.paper_ablations(ROOT/'data/paper_ablations.csv')
    assert list(df.columns) == ['table', 'row', 'switches', 'metric', 'value', 'note']
    assert set(df.metric) <= set(viz.METRICS)
    assert not df.duplicated(['table', 'row', 'metric']).any()
    t5 = df[df.table == 'V']
    assert t5.groupby('row').size().eq(7).all() and t5.row.nunique() == 13
    for s in t5.switches: assert sorted(viz.parse_switches(s)) == sorted(viz.SWITCHES)
    # every published number is a percentage, and only row 11's mAP (the flagged typo) breaks R1@0.7 >= mAP
    assert df.value.between(0, 100).all()
    piv = t5.pivot(index='row', columns='metric', values='value')
    assert list(piv.index[piv['MR-full-mAP'] >= piv['MR-full-R1@0.7']]) == ['11']
    assert 'typo' in t5[(t5.row == '11') & (t5.metric == 'MR-full-mAP')].note.item()
    # the full model (row 13) is the best row on every metric
    assert (piv.loc['13'] >= piv.drop(['11', '13']).max()).all()
    # Table VII: FRA improves every method on every metric
    t7 = df[df.table == 'VII'].pivot(index='row', columns='metric', values='value')
    for m in ('Moment-DETR', 'QD-DETR', 'TR-DETR'): assert (t7.loc[m + '+FRA'] > t7.loc[m]).all()


def test_every_ablation_row_builds_a_config():
    from videolights.config import get_preset
    df = viz.paper_ablations(ROOT/'data/paper_ablations.csv')
    for r, s in df[df.table == 'V'].drop_duplicates('row')[['row', 'switches']].values:
        over, notes = exps.ablation_overrides(viz.parse_switches(s))
        cfg = get_preset('tiny', **over)
        sw = viz.parse_switches(s)
        assert cfg.use_fra == bool(sw['fra']) and cfg.cmf == ('bi' if sw['bi'] else 'uni'), r
        assert cfg.hard_pos_neg_loss == bool(sw['hl']) and cfg.align_loss == bool(sw['al']), r
        assert notes == [f"bf={sw['bf']} not applied", f"pt={sw['pt']} not applied"]


def _explorer(**kw):
    preds = viz.load_jsonl_records(PREDS)[:60]
    return viz.explore(preds, GT, **kw)


def test_explorer_widgets_drive_the_figure():
    ui = _explorer()
    c, ex = ui.controls, ui.explorer
    assert len(c['select'].options) == 60
    c['search'].value = 'girl MOTHER'                       # case-insensitive, every word must match
    assert [q for _, q in c['select'].options] == [2579]
    assert c['select'].value == 2579
    fig = ex.last_fig
    assert fig._suptitle.get_text().startswith('qid 2579: A girl and her mother')
    tl = fig.axes[0]
    assert len(tl.patches) == 1 + 5                          # 1 GT window + top-5 predictions
    assert tl.patches[0].get_x() == 82 and tl.patches[0].get_width() == 68
    assert 'top1 IoU</b> 0' in c['info'].value
    c['search'].value = ''
    other = [q for _, q in c['select'].options if q != 2579][0]
    c['select'].value = other
    assert ex.last_fig._suptitle.get_text().startswith(f'qid {other}:')
    plt.close('all')


def test_explorer_attention_controls():
    g = torch.Generator().manual_seed(0)
    attn = {'enc0.self': torch.rand(1, 3, 75, 75, generator=g).softmax(-1),
            'dec0.cross': torch.rand(1, 3, 4, 75, generator=g).softmax(-1),
            'dec1.cross': torch.rand(1, 3, 4, 75, generator=g).softmax(-1)}
    spans = torch.tensor([[[.5, .2], [.1, .1], [.3, .2], [.9, .1]]])
    outs = dict(pred_logits=torch.zeros(1, 4, 2), pred_spans=spans, attn=attn,
                aux_outputs=[dict(pred_logits=torch.zeros(1, 4, 2), pred_spans=spans / 2)])
    ui = _explorer(outputs_fn=lambda q: outs)
    c, ex = ui.controls, ui.explorer
    assert list(c['attn'].options) == ['(none)', 'enc.self', 'dec.cross']
    assert (c['layer'].max, c['layer'].value, len(c['head'].options)) == (1, 1, 4)
    assert len(ex.last_fig.axes) == 3                        # no attention chosen yet: timeline + saliency (+ twin)
    c['attn'].value = 'dec.cross'
    c['layer'].value = 0
    c['head'].value = 2
    ax = ex.last_fig.axes[2]
    assert ax.get_title() == 'dec.cross layer 0 head 2'
    np.testing.assert_allclose(ax.images[0].get_array(), attn['dec0.cross'][0, 2].numpy(), rtol=1e-6)
    c['head'].value = -1                                     # mean over heads
    np.testing.assert_allclose(ex.last_fig.axes[2].images[0].get_array(), attn['dec0.cross'][0].mean(0).numpy(),
                               rtol=1e-5)
    c['layer'].value = 1
    c['attn'].value = 'enc.self'                             # one layer only: the slider value is clamped
    assert ex.last_fig.axes[2].get_title() == 'enc.self layer 0 head mean'
    plt.close('all')


def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format='png', metadata={'Software': None})
    plt.close(fig)
    return buf.getvalue()


def test_figures_are_deterministic():
    gt = viz.by_qid(viz.load_jsonl_records(GT))[2579]
    pred = viz.by_qid(viz.load_jsonl_records(PREDS))[2579]
    assert _png(viz.plot_query(pred, gt)) == _png(viz.plot_query(pred, gt))


def test_errors_name_the_fault(tmp_path):
    (tmp_path/'metrics.jsonl').write_text('{"epoch": 0}\n{oops\n')
    with pytest.raises(ValueError, match='metrics.jsonl:2'): viz.read_log(tmp_path)
    with pytest.raises(FileNotFoundError, match='no metrics log'): viz.read_log(tmp_path/'nope')
    with pytest.raises(IndexError, match='has 2 layers'): viz.attn_map({'a': [torch.rand(1, 3, 3)]*2}, 'a', layer=2)


def test_ablate_cli_plot_only_and_errors(tmp_path, capsys):
    res = pd.DataFrame([dict(table='V', row=r, switches='', metric=m, value=v + s, seed=s, data='stub', note='')
                        for r, v in (('1', 20.), ('13', 30.)) for m in viz.METRICS for s in (0, 1)])
    res.to_csv(tmp_path/'results.csv', index=False)
    assert exps.ablate_main(['--plot-only', str(tmp_path/'results.csv'), '--figdir', str(tmp_path)]) == 0
    assert (tmp_path/'ablation_table_V.png').stat().st_size > 10_000
    assert '30.5' in capsys.readouterr().out                  # row 13 mean over seeds
    with pytest.raises(SystemExit): exps.ablate_main(['--rows', '1'])   # --data missing
    capsys.readouterr()
    for argv, msg in [(['--data', str(tmp_path/'nowhere')], '--data: '),                    # no such folder
                      (['--data', str(tmp_path), '--rows', '99'], 'unknown rows'),
                      (['--plot-only', str(tmp_path/'none.csv')], 'does not exist'),
                      (['--data', str(tmp_path), '--skip', ''], '--pretrain-ckpt')]:     # pt applied, no checkpoint
        with pytest.raises(SystemExit) as e: exps.ablate_main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err
    (tmp_path/'ann').mkdir()
    argv = ['--data', str(tmp_path/'ann'), '--rows', '1', '--epochs', '1', '--out', str(tmp_path/'o')]
    for extra, msg in [(None, 'is an empty folder'), ('notes.txt', 'annotations')]:     # empty; no annotations there
        if extra: (tmp_path/'ann'/extra).write_text('x')
        assert run_command('videolights ablate', exps.ablate_main, argv) == 2
        err = capsys.readouterr().err
        assert err.startswith('videolights ablate: error: ') and msg in err and 'Traceback' not in err
        assert len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match='needs pretraining'):
        exps.train_ablation_row(dict(pretrained=True), 0, tmp_path/'r', 'x')


def _chromium():
    return shutil.which('chromium') or shutil.which('chromium-browser')


def _web_assets():
    web = Path(os.environ.get('VIDEOLIGHTS_WEB_ASSETS', '~/.cache/videolights/web')).expanduser()
    req, emb = (list(web.glob('requirejs*/package/require.js')),
                list(web.glob('*html-manager*/package/dist/embed-amd.js')))
    return (req[0], emb[0]) if req and emb else None


@pytest.mark.slow
def test_explorer_renders_in_headless_chromium(tmp_path):
    """Train a tiny model on small synthetic data, execute a notebook that opens the explorer on the run (decoder
    cross-attention selected), export it to HTML with the widget state, load it in headless Chromium and check that
    the widgets and the figure rendered; the screenshot goes to figures/explorer.png.
    Needs the Debian package `chromium` and, offline, local copies of the widget renderer: in
    ~/.cache/videolights/web (or $VIDEOLIGHTS_WEB_ASSETS) run
    `npm pack @jupyter-widgets/html-manager@1.0.15 requirejs@2.3.8` and untar both (`tar xzf X.tgz --one-top-level`)."""
    chromium, assets = _chromium(), _web_assets()
    if chromium is None: pytest.skip('chromium not installed (apt-get install -y chromium)')
    if assets is None: pytest.skip('widget renderer JS not found (see the docstring for how to get it)')
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter
    data, run = tmp_path/'data', tmp_path/'run'
    src = ("import matplotlib; matplotlib.rcParams['figure.dpi'] = 80\n"
           "from videolights.synth import synth\n"
           "from videolights.visualize import explore, query_metrics\n"
           "from videolights.experiments import train_ablation_row\n"
           f"synth({str(data)!r}, seed=0, size='small', n_train=200, n_val=50, progress=False)\n"
           f"train_ablation_row({{}}, 0, {str(run)!r}, {str(data)!r}, epochs=8)\n"
           f"ui = explore({str(run)!r}, {str(data)!r})\n"
           "c = ui.controls\n"
           "ex = ui.explorer\n"
           "c['select'].value = max(ex.preds, key=lambda q: query_metrics(ex.preds[q], ex.gt[q])['top1 IoU'])\n"
           "c['attn'].value = 'dec.cross'\nui")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src)])
    nb.metadata['kernelspec'] = dict(name='python3', display_name='python3', language='python')
    NotebookClient(nb, timeout=600, kernel_name='python3', store_widget_state=True,
                   resources={'metadata': {'path': str(ROOT)}}).execute()
    assert 'application/vnd.jupyter.widget-state+json' in nb.metadata['widgets']
    html, _ = HTMLExporter(template_name='lab', require_js_url=assets[0].as_uri(),
                           widget_renderer_url=assets[1].as_uri()).from_notebook_node(nb)
    page = tmp_path/'explorer.html'
    page.write_text(html)
    flags = ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
             '--disable-component-update', '--disable-sync', '--virtual-time-budget=15000']
    run_browser = lambda *extra: subprocess.run([chromium, *flags, f'--user-data-dir={tempfile.mkdtemp()}', *extra,
                                                 page.as_uri()], capture_output=True, text=True, timeout=180)
    dom = run_browser('--dump-dom').stdout
    for cls in ('widget-text', 'widget-select', 'widget-dropdown', 'widget-hslider', 'widget-output'):
        assert cls in dom, f'{cls} not rendered'
    assert 'dec.cross' in dom
    out_area = dom[dom.index('widget-output'):]
    assert '<img' in out_area and 'data:image/png;base64' in out_area, 'no figure in the explorer output'
    shot = ROOT/'figures'/'explorer.png'
    shot.parent.mkdir(exist_ok=True)
    run_browser('--window-size=1000,1300', f'--screenshot={shot}')
    img = plt.imread(shot)
    assert img.shape[:2] == (1300, 1000) and img[..., :3].std() > 0.05   # not a blank page


@pytest.fixture(scope='module')
def tiny_synth(tmp_path_factory):
    from videolights.synth import synth
    d = tmp_path_factory.mktemp('synth')/'data'
    synth(d, seed=0, size='tiny', progress=False)
    return d


def test_ablate_end_to_end_on_tiny_synth(tiny_synth, tmp_path, capsys):
    out, figs = tmp_path/'ablate', tmp_path/'figs'
    rc = exps.ablate_main(['--data', str(tiny_synth), '--rows', '1,6', '--epochs', '2', '--seeds', '1',
                          '--out', str(out), '--figdir', str(figs)])
    assert rc == 0
    res = pd.read_csv(out/'results.csv', dtype={'row': str}, keep_default_na=False)
    assert sorted(set(res.row)) == ['1', '6'] and set(res.metric) == set(viz.METRICS)
    assert res.value.between(0, 100).all()
    assert set(res.note) == {'bf=0 not applied; pt=0 not applied', 'bf=1 not applied; pt=0 not applied'}
    assert res.data.str.contains('synthetic proxy').all()
    # the rows really trained different models: row 1 has no FRA and uni-CMF, row 6 both
    cfg1 = json.loads((out/'row1_seed0'/'config.json').read_text())['config']
    cfg6 = json.loads((out/'row6_seed0'/'config.json').read_text())['config']
    assert (cfg1['use_fra'], cfg1['cmf'], cfg6['use_fra'], cfg6['cmf']) == (False, 'uni', True, 'bi')
    assert (figs/'ablation_table_V.png').stat().st_size > 10_000
    # explore(run, data) loads the run's best checkpoint and offers its attention maps
    ui = viz.explore(out/'row6_seed0', tiny_synth)
    assert 'dec.cross' in ui.controls['attn'].options
    ui.controls['attn'].value = 'dec.cross'
    assert ui.explorer.last_fig.axes[2].get_title().startswith('dec.cross layer')
    plt.close('all')
