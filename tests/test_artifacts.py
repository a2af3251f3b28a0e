"""Checkpoints as artefacts: pretrained folders (config.json + model.safetensors), official checkpoints converted to
them, and the commands that accept the three forms (our checkpoint or run, an official checkpoint, a folder)."""
import argparse, json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

from videolights.artifacts import (CONFIG_FILE, WEIGHTS_FILE, convert_official, from_pretrained, is_pretrained,
                                   read_pretrained_config, save_pretrained)
from videolights.config import get_preset
from videolights.convert import to_official_state_dict
from videolights.model import build_model, random_inputs

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO/'tests'/'fixtures'/'official_small.pt'
ENV = dict(os.environ, OMP_NUM_THREADS='1', MPLBACKEND='Agg')
OUT_KEYS = ('pred_logits', 'pred_spans', 'saliency_scores')


def vl(*args, timeout=600):
    return subprocess.run([sys.executable, '-m', 'videolights', *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def outputs(model, inputs):
    with torch.no_grad(): return {k: v for k, v in model.eval()(**inputs).items() if k in OUT_KEYS}


def fixture_opt(cfg):
    "The options an official run with the fixture's shape records (feature folders that name no known source)."
    return argparse.Namespace(dset_name='hl', ctx_mode='video_tef', v_feat_dim=cfg.v_feat_dim,
                              t_feat_dim=cfg.t_feat_dim,
                              v_feat_dirs=['features/video_features'], t_feat_dirs=['features/query_features'],
                              clip_length=2, hidden_dim=cfg.hidden_dim, nheads=cfg.nheads,
                              dim_feedforward=cfg.dim_feedforward, bicmf_layers=cfg.bicmf_layers,
                              enc_layers=cfg.enc_layers, dec_layers=cfg.dec_layers, num_queries=cfg.num_queries,
                              max_q_l=cfg.max_q_l, max_v_l=cfg.max_v_l, n_input_proj=cfg.n_input_proj,
                              contrastive_hdim=cfg.contrastive_hdim, lr=1e-4, n_epoch=200)


@pytest.fixture(scope='module')
def official_ckpt(tmp_path_factory):
    "The stored official weights (tests/fixtures/official_small.pt) as an official model_best.ckpt, and the fixture."
    fx = torch.load(FIXTURE, map_location='cpu', weights_only=True)
    sd = {**{k: fx['q'][k].float() * fx['scale'][k] for k in fx['q']}, **fx['other']}
    cfg = get_preset(fx['preset'], **fx['cfg'])
    path = tmp_path_factory.mktemp('official')/'model_best.ckpt'
    torch.save(dict(model=sd, opt=fixture_opt(cfg), epoch=57, optimizer={}, lr_scheduler={}), path)
    return path, fx


def test_round_trip_gives_the_same_outputs(tmp_path):
    "ours -> pretrained folder -> the same outputs, bit for bit, for a preset-sized model with a few random weights."
    cfg = get_preset('qvhighlights_sf_clip', enc_layers=1, dec_layers=2, dim_feedforward=64)
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    save_pretrained(model, cfg, tmp_path/'m', source=dict(kind='videolights', checkpoint='x.ckpt'))
    assert is_pretrained(tmp_path/'m') and sorted(p.name for p in (tmp_path/'m').iterdir()) == [CONFIG_FILE,
            WEIGHTS_FILE]
    back, cfg2 = from_pretrained(tmp_path/'m')
    assert cfg2 == cfg
    inp = random_inputs(cfg, B=3, seed=1)
    a, b = outputs(model, inp), outputs(back, inp)
    for k in OUT_KEYS: assert torch.equal(a[k], b[k]), k
    for k, v in model.state_dict().items(): assert torch.equal(v, back.state_dict()[k]), k


def test_the_folder_is_readable_without_torch_or_videolights(tmp_path):
    "A fresh interpreter with only json + safetensors.numpy: names, dtypes, shapes and the input widths."
    cfg = get_preset('tiny')
    model = build_model(cfg)
    save_pretrained(model, cfg, tmp_path/'m')
    code = ("import json, sys; from safetensors.numpy import load_file\n"
            f"d = {str(tmp_path/'m')!r}\n"
            "info = json.load(open(d + '/config.json')); w = load_file(d + '/model.safetensors')\n"
            "print(json.dumps(dict(fmt=info['format'], ver=info['format_version'], inputs=info['inputs'],\n"
            "  hidden=info['config']['hidden_dim'], n=len(w), dtypes=sorted({str(a.dtype) for a in w.values()}),\n"
            "  first=list(w['input_vid_proj.0.proj.weight'].shape), mods=sorted(m for m in sys.modules if m in "
            "('torch', 'videolights')))))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got['mods'] == []                                               # neither torch nor videolights was imported
    assert (got['fmt'], got['ver'], got['hidden'], got['dtypes']) == ('videolights-pretrained', 1, 32, ['float32'])
    assert got['n'] == len(model.state_dict())
    assert got['first'] == list(model.input_vid_proj[0].proj.weight.shape)
    assert got['inputs']['video'] == dict(zip(cfg.v_feat_types,
                                              cfg.v_feat_dims)) and got['inputs']['video_dim'] == cfg.v_feat_dim


def test_official_checkpoint_converted_gives_the_official_outputs(official_ckpt, tmp_path):
    "official model_best.ckpt -> convert-official -> pretrained folder -> the outputs the official code computed."
    path, fx = official_ckpt
    r = vl('convert-official', path, tmp_path/'conv')
    assert r.returncode == 0, r.stderr
    model, cfg = from_pretrained(tmp_path/'conv')
    assert (cfg.v_feat_types, cfg.t_feat_types, cfg.hidden_dim, cfg.dec_layers) == (('video',), ('text',), 256, 2)
    with torch.no_grad(): out = model(**fx['inputs'])
    valid = fx['inputs']['src_vid_mask'].bool()          # padded clips' saliency is no prediction (and not masked)
    for k in OUT_KEYS:
        a, b = (out[k], fx['outputs'][k]) if k != 'saliency_scores' else (out[k][valid], fx['outputs'][k][valid])
        assert float((a - b).abs().max()) <= 1e-5, k
    other = outputs(build_model(cfg), fx['inputs'])  # not trivially satisfied: other weights differ
    assert float((other['pred_spans'] - out['pred_spans']).abs().max()) > 1e-3
    info = json.loads((tmp_path/'conv'/CONFIG_FILE).read_text())
    assert info['source'] == dict(kind='official', checkpoint=str(path), epoch=57)


def test_convert_official_errors_are_one_line(official_ckpt, tmp_path):
    path, fx = official_ckpt
    ck = torch.load(path, weights_only=False)
    torch.save(ck['model'], tmp_path/'bare.pt')                              # a bare state dict: needs --preset
    r = vl('convert-official', tmp_path/'bare.pt', tmp_path/'o')
    assert r.returncode == 2 and "no 'opt'" in r.stderr and '--preset' in r.stderr and 'Traceback' not in r.stderr
    r = vl('convert-official', tmp_path/'bare.pt', tmp_path/'o', '--preset', 'qvhighlights')   # the wrong shape
    assert r.returncode == 2 and 'does not fit this VLConfig' in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path/'o'/WEIGHTS_FILE).exists()
    r = vl('convert-official', tmp_path/'missing.ckpt', tmp_path/'o')
    assert r.returncode == 2 and 'missing.ckpt' in r.stderr


def test_a_bad_folder_is_a_clear_error(tmp_path):
    cfg = get_preset('tiny')
    save_pretrained(build_model(cfg), cfg, tmp_path/'m')
    info = json.loads((tmp_path/'m'/CONFIG_FILE).read_text())
    (tmp_path/'m'/CONFIG_FILE).write_text(json.dumps(dict(info, format_version=2)))
    with pytest.raises(ValueError, match='format_version 2 is newer'): read_pretrained_config(tmp_path/'m')
    (tmp_path/'m'/CONFIG_FILE).write_text(json.dumps(dict(info, config=dict(info['config'], num_queries=7))))
    with pytest.raises(ValueError, match=r'does not fit its config: mis-shaped \(\d+\): query_embed'):
        from_pretrained(tmp_path/'m')
