"""Switches and promises that a shape test cannot see: each loss switch removes exactly its own term, eval runs the
transformer once (no negative pass), the returned attention maps are the ones the layers computed, and the uni-CMF
and no-FRA ablation variants reproduce the official code (live, when the checkout is present)."""
import dataclasses, importlib.util, os, sys, types
from pathlib import Path

import pytest
import torch

from videolights.config import VLConfig, get_preset
from videolights.layers import Attention
from videolights.loss import align_vid_txt_loss, build_criterion, saliency_terms
from videolights.model import build_model, random_inputs
from videolights.ops import accelerate

sys.path.insert(0, str(Path(__file__).parent))
from test_overfit import real_batch  # noqa: E402  (the 3-sample batch in the real format)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tools' / 'official'))
import official_harness  # noqa: E402  (finds the official checkout through $VIDEOLIGHTS_OFFICIAL)
OFFICIAL_MISSING = official_harness.missing()
torch.set_num_threads(1)


def _outputs(cfg, seed=0, epoch=3):
    "Training-mode outputs of the real tiny model on the real-format batch (detached), and its targets."
    torch.manual_seed(seed)
    model = build_model(cfg).train()
    inputs, targets = real_batch(cfg, seed)
    with torch.no_grad(): out = model(**inputs)
    return out, targets


# ---------------------------------------------------------------- loss switches (Table V hl / tcl / scsl / al)
SALIENCY_SWITCHES = {'hard_pos_neg_loss': ('hard_neg', 'hard_pos'), 'mr_to_hd_loss': ('task_coupled',),
                     'cos_sim_loss': ('cos_sim',)}


@pytest.mark.parametrize('fixed', [False, True])
@pytest.mark.parametrize('switch', sorted(SALIENCY_SWITCHES) + ['align_loss'])
def test_each_loss_switch_removes_exactly_its_term(switch, fixed):
    """Same model outputs, criterion built from the config with one switch off: one loss moves, by its term, the rest
    stay."""
    fix = {k: True for k in VLConfig().fixes} if fixed else {}
    cfg_on, cfg_off = VLConfig(**fix), VLConfig(**fix, **{switch: False})
    out, t = _outputs(cfg_on)
    on, off = build_criterion(cfg_on)(out, t, epoch=3), build_criterion(cfg_off)(out, t, epoch=3)
    assert set(on) == set(off)
    changed = 'loss_contrastive_align' if switch == 'align_loss' else 'loss_saliency'
    for k in on:
        if k != changed: assert torch.equal(on[k], off[k]), (switch, k)
    if switch == 'align_loss':
        ca = build_criterion(cfg_on).losses['contrastive_align']
        tm = out['txt_mask'].float() if ca['mask_text'] else None
        vm = out['video_mask'].float() if ca['mask_padding'] else None
        term = align_vid_txt_loss(out['src_txt'], out['src_vid'], t['saliency_all_labels'], tm, vm,
                                  ca['sample_min'], ca['batch_mean'])
    else:
        terms = saliency_terms(out, t, 3, **build_criterion(cfg_on).losses['saliency'])
        term = sum(terms[n] for n in SALIENCY_SWITCHES[switch])
    assert abs(float(term)) > 1e-3, (switch, float(term))  # the term is really there ...
    torch.testing.assert_close(on[changed] - off[changed], term, atol=1e-5, rtol=1e-5)  # ... and only it goes


def _legacy(cfg):
    "The config as the loss module saw it before the loss-fix parts were VLConfig fields (getattr defaults apply)."
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for n in ('fix_loss_sample_min', 'fix_loss_batch_mean', 'fix_loss_text_masking', 'hard_loss_ramp_max'): d.pop(n)
    return types.SimpleNamespace(**d)


@pytest.mark.parametrize('name,kw', [('qvhighlights', {}), ('fixed', {}), ('tiny', dict(fix_loss_masking=True)),
                                     ('tvsum', dict(fix_hard_loss_ramp=True))])
def test_loss_fix_fields_keep_the_old_defaults(name, kw):
    "Unset, the new loss-fix fields give build_criterion exactly what it read before they existed."
    cfg = get_preset(name, **kw)
    assert build_criterion(cfg).losses == build_criterion(_legacy(cfg)).losses


def test_loss_fix_parts_are_separate_switches():
    "Each part reaches the criterion alone, and changes the loss value on a padded batch."
    sal = lambda c: build_criterion(c).losses['saliency']
    ca = lambda c: build_criterion(c).losses['contrastive_align']
    c = VLConfig(fix_loss_batch_mean=True)
    assert (sal(c)['batch_mean'], sal(c)['sample_min'], sal(c)['mask_padding'], ca(c)['mask_text']) == (True, False,
            False, False)
    c = VLConfig(fix_loss_sample_min=True)
    assert (sal(c)['sample_min'], ca(c)['sample_min'], sal(c)['batch_mean']) == (True, True, False)
    c = VLConfig(fix_loss_text_masking=True)
    assert (ca(c)['mask_text'], ca(c)['mask_padding'], sal(c)['sample_min']) == (True, False, False)
    c = VLConfig(fix_loss_masking=True, fix_loss_sample_min=False)
    assert (sal(c)['mask_padding'], sal(c)['sample_min'], sal(c)['batch_mean'], ca(c)['mask_text']) == (True, False,
            True, True)
    c = VLConfig(fix_hard_loss_ramp=True, hard_loss_ramp_max=4)
    assert (sal(c)['bounded_ramp'], sal(c)['ramp_max']) == (True, 4)
    out, t = _outputs(VLConfig())
    base = build_criterion(VLConfig())(out, t, epoch=3)
    for part, key in (('fix_loss_sample_min', 'loss_saliency'), ('fix_loss_batch_mean', 'loss_saliency'),
                      ('fix_loss_text_masking', 'loss_contrastive_align')):
        got = build_criterion(VLConfig(**{part: True}))(out, t, epoch=3)
        assert abs(float(got[key] - base[key])) > 1e-4, part
    # the ramp cap: at epoch 3 a cap of 2 halves nothing but scales the hard terms by 2/4
    capped = build_criterion(VLConfig(fix_hard_loss_ramp=True, hard_loss_ramp_max=2))(out, t, epoch=3)
    terms = saliency_terms(out, t, 3, **build_criterion(VLConfig()).losses['saliency'])
    hard = terms['hard_neg'] + terms['hard_pos']
    torch.testing.assert_close(base['loss_saliency'] - capped['loss_saliency'], hard * (1 - 2 / 4), atol=1e-5,
                               rtol=1e-5)


# ---------------------------------------------------------------- eval runs the transformer once
def _calls(model, inputs, **kw):
    "Input shapes (feature dim dropped) of every call of the first cross-modal layer and the first encoder layer."
    seen = {'cmf': [], 'enc': []}
    def hook(key):
        def f(mod, args): seen[key].append(tuple(args[0].shape[:-1]))
        return f
    hs = [model.transformer.t2v_encoder.layers[0].register_forward_pre_hook(hook('cmf')),
          model.transformer.encoder.layers[0].register_forward_pre_hook(hook('enc'))]
    try: model(**inputs, **kw)
    finally:
        for h in hs: h.remove()
    return seen


@pytest.mark.parametrize('cmf', ['bi', 'uni'])
def test_eval_runs_the_transformer_once(cmf):
    """Accelerated model. Eval: one pass on the real rows only (padded (B, Lv) with attention maps); loss outputs: 2B
    batched; training: the padded positive pass plus the negative pass on real rows (batched 2B with
    pack_neg_pass=False)."""
    cfg = VLConfig(cmf=cmf)
    model = accelerate(build_model(cfg))
    lv = [20, 32, 9]
    B, Lv, n = 3, 32, sum(lv)
    inp = random_inputs(cfg, B=B, lv=lv, lq=[5, 16, 3])
    batched = {'cmf': [(B, Lv), (B, Lv)], 'enc': [(2 * B, Lv + 1)]}  # official-mask groups: one Bi-CMF call per half
    model.eval()
    with torch.no_grad():
        assert _calls(model, inp) == {'cmf': [(n,)], 'enc': [(n + B,)]}  # packed: real clips (+ B global tokens)
        assert _calls(model, inp, return_attn=True) == {'cmf': [(B, Lv)], 'enc': [(B, Lv + 1)]}
        assert _calls(model, inp, loss_outputs=True) == batched
    model.train()
    assert _calls(model, inp) == {'cmf': [(B, Lv), (n,)], 'enc': [(B, Lv + 1), (n + B,)]}
    assert _calls(accelerate(build_model(VLConfig(cmf=cmf, pack_neg_pass=False))).train(), inp) == batched
    assert _calls(accelerate(build_model(VLConfig(cmf=cmf, loss_outputs_eval=True))).eval(), inp) == batched


@pytest.mark.parametrize('cmf', ['bi', 'uni'])
def test_plain_model_runs_every_pass_padded(cmf):
    "The plain model of `07_model`: eval runs the transformer once, loss outputs add a second (negative) padded pass."
    cfg = VLConfig(cmf=cmf)
    model = build_model(cfg)
    B, Lv = 3, 32
    inp = random_inputs(cfg, B=B, lv=[20, 32, 9], lq=[5, 16, 3])
    once, twice = {'cmf': [(B, Lv)], 'enc': [(B, Lv + 1)]}, {'cmf': [(B, Lv)] * 2, 'enc': [(B, Lv + 1)] * 2}
    with torch.no_grad():
        assert _calls(model.eval(), inp) == once
        assert _calls(model, inp, loss_outputs=True) == twice
    assert _calls(model.train(), inp) == twice


# ---------------------------------------------------------------- attention maps are the layers' own
def _attention_names(model, cfg):
    "Our `out['attn']` key for every Attention module."
    tr, names = model.transformer, {}
    for i, layer in enumerate(tr.t2v_encoder.layers):
        if cfg.cmf == 'bi':
            names.update({layer.cross_attn_1: f'cmf{i}.t2v', layer.cross_attn_2: f'cmf{i}.v2t',
                          layer.cross_attn_3: f'cmf{i}.t2v_2'})
        else: names[layer.self_attn] = f'cmf{i}.t2v'
    for i, layer in enumerate(tr.encoder.layers): names[layer.self_attn] = f'enc{i}.self'
    for i, layer in enumerate(tr.decoder.layers): names.update({layer.self_attn: f'dec{i}.self',
                                                                layer.cross_attn: f'dec{i}.cross'})
    assert set(names) == {m for m in model.modules() if isinstance(m, Attention)}  # every attention layer is named
    return names


@pytest.mark.parametrize('fast', [False, True], ids=['plain', 'fast'])
@pytest.mark.parametrize('cmf,train', [('bi', False), ('uni', False), ('bi', True)])
def test_returned_attention_maps_are_the_layers_maps(cmf, train, fast):
    """Each out['attn'][name] is exactly the map its layer computed (first call = positive pass), rows sum to 1, padded
    keys 0."""
    cfg = VLConfig(cmf=cmf)
    torch.manual_seed(0)
    model = build_model(cfg).train(train)
    if fast: accelerate(model)
    B = 3
    inp = random_inputs(cfg, B=B, lv=[20, 32, 9], lq=[5, 16, 3], seed=4)
    names, got = _attention_names(model, cfg), {}
    def hook(mod, args, output):
        if names[mod] not in got: got[names[mod]] = output[1]  # first call: the positive pass (training: group 0)
    hs = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.set_grad_enabled(train): out = model(**inp, return_attn=True)
    finally:
        for h in hs: h.remove()
    assert set(out['attn']) == set(got) == set(names.values())
    vpad, tpad = inp['src_vid_mask'] == 0, inp['src_txt_mask'] == 0
    gpad = torch.cat([torch.zeros(B, 1, dtype=torch.bool), vpad], 1)  # encoder keys: global token + clips
    key_pad = {'t2v': tpad, 't2v_2': tpad, 'v2t': vpad, 'self': gpad, 'cross': vpad}
    for name, w in out['attn'].items():
        ref = got[name] if not name.startswith('enc') else got[name][:B]  # training: the encoder runs 2B rows at once
        assert w is not None and torch.equal(w, ref), name
        assert w.shape[0] == B and w.shape[1] == cfg.nheads, (name, w.shape)
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5, rtol=0)
        kind = name.split('.')[1]
        if not name.startswith('dec') or kind == 'cross':
            kp = key_pad[kind]
            assert float(w.detach().masked_select(kp[:, None, None, :].expand_as(w)).abs().max()) == 0., name
    # the three Bi-CMF maps differ (a swap of two of them fails the equality above)
    if cmf == 'bi': assert not torch.equal(out['attn']['cmf0.t2v'], out['attn']['cmf0.t2v_2'])


# ---------------------------------------------------------------- uni-CMF and no-FRA against the official code
def _checker():
    spec = importlib.util.spec_from_file_location('check_official_model', REPO / 'tools' / 'check_official_model.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(OFFICIAL_MISSING is not None, reason=str(OFFICIAL_MISSING))
@pytest.mark.parametrize('fast', [False, True], ids=['plain', 'fast'])
@pytest.mark.parametrize('kw', [dict(cmf='uni'), dict(fra=False)], ids=['uni_cmf', 'no_fra'])
def test_live_official_ablation_variants(kw, fast):
    """Table V 'bi' and 'fra' rows: the official T2V layer / no-FRA model with converted weights give our outputs to
    1e-5."""
    chk = _checker()
    vo, off = chk.official_lib()
    res = chk.check_variant(vo, off, 'sf_clip', B=4, seed=3, grads=False, fast=fast, **kw)
    assert max(res['diffs'].values()) <= 1e-5, res['diffs']
    assert res['params_official'] == res['params_ours']
    assert {'pred_logits', 'pred_spans', 'saliency_scores'} <= set(res['diffs'])
