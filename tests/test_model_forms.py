"""One resolver for the three forms of a model: our checkpoint (or its run folder), a checkpoint written the way the
official `train.py` writes one (official names, `opt` as an `argparse.Namespace`), and a pretrained folder. Every
command that takes a model accepts each form and gives the same results: `evaluate`, `train --init-from`, `predict`,
the app and the explorer. The checkpoints are built here from one random model."""
import json, os, subprocess, sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from videolights.artifacts import (load_any, resolve_model, save_official_checkpoint, save_pretrained, init_weights,
                                   official_opt)
from videolights.config import get_preset
from videolights.model import build_model, random_inputs
from videolights.train import save_checkpoint, config_dict, nms_submission
from videolights.errors import BadInputError

ENV = dict(os.environ, OMP_NUM_THREADS='1', MPLBACKEND='Agg')
KINDS = ('videolights', 'official', 'pretrained')


def vl(*args, timeout=600):
    return subprocess.run([sys.executable, '-m', 'videolights', *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def write_forms(model, cfg, d: Path) -> dict:
    "The same weights as our run folder, an official model_best.ckpt and a pretrained folder."
    save_checkpoint(dict(model=model.state_dict(), config=config_dict(cfg), epoch=3), d/'run'/'model_best.ckpt')
    save_official_checkpoint(model, cfg, d/'official'/'model_best.ckpt', epoch=3)
    save_pretrained(model, cfg, d/'pretrained')
    return dict(videolights=d/'run', official=d/'official'/'model_best.ckpt', pretrained=d/'pretrained')


@pytest.fixture(scope='module')
def forms(tmp_path_factory):
    "A synthetic dataset in the official layout with the published widths, and one random model in the three forms."
    d = tmp_path_factory.mktemp('forms')
    r = vl('synth', '--out', d/'data', '--size', 'tiny', '--dims', 'real', '--seed', 1, '--no-h5')
    assert r.returncode == 0, r.stderr
    cfg = get_preset('tiny', v_feat_types=('slowfast', 'clip'), v_feat_dims=(2304, 512), t_feat_types=('clip',),
                     t_feat_dims=(512,), max_v_l=75)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    return SimpleNamespace(dir=d, data=d/'data', cfg=cfg, model=model, paths=write_forms(model, cfg, d))


def test_resolver_tells_the_forms_apart(forms):
    p = forms.paths
    assert [resolve_model(p[k]).kind for k in KINDS] == list(KINDS)
    assert resolve_model(p['videolights']).path.name == 'model_best.ckpt'             # a run folder: its best
    with pytest.raises(Exception):                                                    # plain weights_only refuses it
        torch.load(p['official'], weights_only=True)
    inp = random_inputs(forms.cfg, B=2)
    with torch.no_grad():
        want = forms.model(**inp)['pred_spans']
        for k in KINDS:
            m, cfg, src = load_any(p[k])
            assert src.kind == k and cfg.v_feat_dims == (2304, 512)
            torch.testing.assert_close(m(**inp)['pred_spans'], want, rtol=0, atol=0)
    (forms.dir/'bare.pt').write_bytes(b'')
    torch.save({'weight': torch.zeros(2)}, forms.dir/'bare.pt')
    with pytest.raises(BadInputError, match='convert-official'): resolve_model(forms.dir/'bare.pt')


def test_evaluate_each_form_writes_the_same_files(forms):
    "`videolights evaluate --ckpt` with each form: the same submission and metrics, byte for byte."
    subs, mets = {}, {}
    for k in KINDS:
        out = forms.dir/f'eval_{k}'
        r = vl('evaluate', '--ckpt', forms.paths[k], '--data', forms.data, '--split', 'val', '--out', out,
               '--device', 'cpu')
        assert r.returncode == 0, r.stderr
        subs[k] = (out/'hl_val_submission.jsonl').read_text()
        mets[k] = json.loads((out/'hl_val_submission_metrics.json').read_text())
    assert subs['official'] == subs['videolights'] == subs['pretrained']
    assert mets['official'] == mets['videolights'] == mets['pretrained']
    assert len(subs['official'].splitlines()) == 6
    assert {'MR-full-mIoU', 'MR-full-R1@0.3', 'HL-min-VeryGood-mAP'} <= set(mets['official']['brief'])


def test_evaluate_nms_file(forms):
    "`--nms-thd`: the official NMS file beside the plain one, as the official inference names it."
    out = forms.dir/'eval_nms'
    r = vl('evaluate', '--ckpt', forms.paths['official'], '--data', forms.data, '--split', 'val', '--out', out,
           '--nms-thd', 0.5, '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    plain = [json.loads(l) for l in (out/'hl_val_submission.jsonl').read_text().splitlines()]
    nms = [json.loads(l) for l in (out/'hl_val_submission_nms_thd_0.5.jsonl').read_text().splitlines()]
    assert nms == json.loads(json.dumps(nms_submission(plain, 0.5, 10, 10)))
    assert (out/'hl_val_submission_nms_thd_0.5_metrics.json').is_file()
    assert sum(len(l['pred_relevant_windows']) for l in nms) < sum(len(l['pred_relevant_windows']) for l in plain)


def test_train_init_from_each_form(forms):
    "`train --init-from` with each form starts from those weights (lr 0: the saved weights are the initial ones)."
    want = forms.model.state_dict()
    for k in KINDS:
        out = forms.dir/f'ft_{k}'
        r = vl('train', '--preset', 'tiny', '--data', forms.data, '--out', out, '--init-from', forms.paths[k],
               '--epochs', 1, '--lr', 0, '--eval_every', 1, '--no-tensorboard', '--device', 'cpu')
        assert r.returncode == 0, r.stderr
        got = torch.load(out/'model_latest.ckpt', weights_only=True)['model']
        assert set(got) == set(want)
        for n, v in want.items(): torch.testing.assert_close(got[n], v, rtol=0, atol=0, msg=f'{k}: {n}')
        assert json.loads((out/'config.json').read_text())['init_from'] == str(forms.paths[k])


def test_init_from_wrong_shape_is_one_line(forms, tmp_path):
    r = vl('train', '--preset', 'tiny', '--data', forms.data, '--out', tmp_path/'x', '--init-from',
           forms.paths['official'], '--hidden_dim', 64, '--epochs', 1, '--device', 'cpu')
    err = [l for l in r.stderr.strip().splitlines() if not l.startswith('note:')]   # the widths note comes first
    assert r.returncode == 2 and len(err) == 1 and 'model_best.ckpt' in err[0] and 'mis-shaped' in err[0], r.stderr


def test_explorer_loads_each_form(forms):
    "The explorer's loader (`visualize.load_run`) gives the same model for each form."
    pytest.importorskip('matplotlib')
    from videolights.visualize import load_run
    inp = random_inputs(forms.cfg, B=2)
    with torch.no_grad():
        want = forms.model(**inp)['saliency_scores']
        for k in KINDS:
            model, ds = load_run(forms.paths[k], data=forms.data)
            assert len(ds) == 6
            m = inp['src_vid_mask'].bool()                                  # the accelerated layers leave pads alone
            torch.testing.assert_close(model(**inp)['saliency_scores'][m], want[m], rtol=1e-5, atol=1e-5)


# --- raw videos: predict and the app ------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def video_forms(tmp_path_factory):
    "A tiny random CLIP of the published widths (512), a model over its features in the three forms, a video."
    pytest.importorskip('av', reason='PyAV decodes the videos')
    pytest.importorskip('transformers', reason='transformers builds the toy CLIP')
    from videolights.video import CLIPEncoder, make_tiny_clip, make_test_video
    d = tmp_path_factory.mktemp('video_forms')
    clip = make_tiny_clip(d/'clip', proj_dim=512, text_dim=512)
    enc = CLIPEncoder(clip)
    cfg = get_preset('tiny', v_feat_types=('clip',), v_feat_dims=(enc.video_dim,), t_feat_types=('clip',),
                     t_feat_dims=(enc.text_dim,), max_v_l=16, max_q_l=32)
    torch.manual_seed(1)
    paths = write_forms(build_model(cfg).eval(), cfg, d)
    (d/'videos').mkdir()
    video = make_test_video(d/'videos'/'street.mp4', duration=24, fps=2, size=(64, 48))
    return SimpleNamespace(dir=d, clip=clip, enc=enc, paths=paths, video=video)


def test_predict_each_form(video_forms, capsys):
    "The predictor and `videolights predict` give the same moments and saliency for each form."
    from videolights.video import VideoLightsPredictor
    from videolights.cli import main as cli_main
    got = {}
    for k in KINDS:
        pr = VideoLightsPredictor.from_pretrained(video_forms.paths[k], encoders={'clip': video_forms.enc})
        p = pr.predict('a dog runs', video_forms.video)
        got[k] = (p.windows.tolist(), p.saliency.tolist())
        out = video_forms.dir/f'pred_{k}.jsonl'
        assert cli_main(['predict', str(video_forms.video), '-q', 'a dog runs', '--ckpt', str(video_forms.paths[k]),
                         '--clip-model', str(video_forms.clip), '--json', str(out), '--device', 'cpu']) == 0
        got[k + '_cli'] = out.read_text()
    assert got['official'] == got['videolights'] == got['pretrained']
    assert got['official_cli'] == got['videolights_cli'] == got['pretrained_cli']


def test_app_each_form(video_forms):
    "The app builds its page for each form and shows the model it loaded."
    pytest.importorskip('ipywidgets')
    from videolights import app as A
    for k in KINDS:
        ui = A.build_app(ckpt=video_forms.paths[k], videos=video_forms.video.parent,
                         sources={'clip': str(video_forms.clip)}, upload_dir=video_forms.dir/'up')
        assert ui.tabs.selected_index == 0 and 'VideoLightsPredictor(video' in ui.children[0].value
