"""VideoLights model: equivalence with the official implementation, shapes, padding invariance, gradients."""
import importlib.util, os, re, sys
from pathlib import Path

import pytest
import torch

from videolights.config import VLConfig, get_preset, PRESETS
from videolights.convert import load_official
from videolights.model import build_model, random_inputs
from videolights.ops import accelerate

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / 'tests' / 'fixtures' / 'official_small.pt'
sys.path.insert(0, str(REPO / 'tools' / 'official'))
import official_harness  # noqa: E402  (finds the official checkout through $VIDEOLIGHTS_OFFICIAL)
OFFICIAL_MISSING = official_harness.missing()
TOL = 1e-5
torch.set_num_threads(1)


def _checker():
    spec = importlib.util.spec_from_file_location('check_official_model', REPO / 'tools' / 'check_official_model.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _maxdiff(a, b):
    return float((a - b).abs().max())


def _build(cfg, fast: bool):
    "The plain model of `build_model`, or the same model accelerated with the fast layers of `ops`."
    m = build_model(cfg)
    return accelerate(m) if fast else m


BOTH = pytest.mark.parametrize('fast', [False, True], ids=['plain', 'fast'])


# ---------------------------------------------------------------- equivalence with the official model
@BOTH
def test_fixture_matches_official_outputs(fast):
    "Official weights (reduced config, int8-exact), inputs and eval outputs stored by tools/check_official_model.py."
    fx = torch.load(FIXTURE, map_location='cpu', weights_only=True)
    sd = {**{k: fx['q'][k].float() * fx['scale'][k] for k in fx['q']}, **fx['other']}
    cfg = get_preset(fx['preset'], loss_outputs_eval=True, **fx['cfg'])
    model = load_official(sd, cfg)
    if fast: accelerate(model)
    with torch.no_grad():
        out = model(**fx['inputs'])
    flat = {k: out[k] for k in fx['outputs'] if k in out}
    for i, a in enumerate(out['aux_outputs']):
        flat.update({f'aux{i}.{k}': v for k, v in a.items() if f'aux{i}.{k}' in fx['outputs']})
    assert set(flat) == set(fx['outputs'])
    for k in ('pred_logits', 'pred_spans', 'saliency_scores', 'saliency_scores_neg', 'saliency_scores_mr'):
        assert k in flat
    diffs = {k: _maxdiff(flat[k], fx['outputs'][k]) for k in flat}
    assert max(diffs.values()) <= TOL, diffs
    # and the fixture is not trivially satisfied: another seed's weights give different outputs
    other = build_model(cfg).eval()
    with torch.no_grad():
        assert _maxdiff(other(**fx['inputs'])['pred_spans'], fx['outputs']['pred_spans']) > 1e-3


def test_fixture_detects_quirk_1():
    """With per-sample Bi-CMF masks (the fix) the stored official outputs are no longer reproduced (batch of mixed
    lengths)."""
    fx = torch.load(FIXTURE, map_location='cpu', weights_only=True)
    sd = {**{k: fx['q'][k].float() * fx['scale'][k] for k in fx['q']}, **fx['other']}
    model = load_official(sd, get_preset(fx['preset'], fix_bicmf_mask_order=True, **fx['cfg']))
    with torch.no_grad():
        out = model(**fx['inputs'])
    assert _maxdiff(out['saliency_scores'], fx['outputs']['saliency_scores']) > 1e-4


@pytest.mark.skipif(OFFICIAL_MISSING is not None, reason=str(OFFICIAL_MISSING))
@BOTH
@pytest.mark.parametrize('variant', ['sf_clip', 'sf_clip_blip'])
def test_live_official_equivalence(variant, fast):
    "Against the official code itself: outputs within 1e-5, equal parameter counts (10.40 M / 10.80 M)."
    chk = _checker()
    vo, off = chk.official_lib()
    res = chk.check_variant(vo, off, variant, B=4, seed=1, grads=variant == 'sf_clip', fast=fast)
    assert max(res['diffs'].values()) <= TOL, res['diffs']
    assert res['params_official'] == res['params_ours'] == OFFICIAL_PARAMS[chk.PRESET[variant]]
    assert round(res['params_ours'] / 1e6, 2) == {'sf_clip': 10.40, 'sf_clip_blip': 10.80}[variant]
    if 'grad_frac_close' in res: assert res['grad_frac_close'] >= 0.999
    if variant == 'sf_clip':  # and the other way: our weights exported into the official model
        assert max(chk.check_export(vo, off, variant, B=3, seed=2, fast=fast)['export_diffs'].values()) <= TOL


def test_float64_plain_and_fast_agree():
    """Float64 runs stay float64: the sine positions (float32, as officially) are widened before use and every
    softmax keeps the input dtype, so the plain and the fast model agree to rounding (a float32 step would leave
    ~1e-7)."""
    cfg = get_preset('qvhighlights', v_feat_dims=(6, 4, 4), t_feat_dims=(5, 3), max_v_l=12, max_q_l=6,
                     dim_feedforward=32, enc_layers=1, dec_layers=2, dropout=0., input_dropout=0., fra_dropout=0.)
    torch.manual_seed(0)
    plain = build_model(cfg).double().train()
    fast = accelerate(build_model(cfg).double().train())
    fast.load_state_dict(plain.state_dict())
    x = {k: v if k.endswith('_mask') else v.double() for k, v in random_inputs(cfg, B=3, seed=1).items()}
    a, b = plain(**x), fast(**x)
    valid = x['src_vid_mask'].bool()   # per-clip outputs: padded clips are not masked (official), not compared
    for k in ('pred_logits', 'pred_spans', 'saliency_scores', 'saliency_scores_neg', 'proj_queries'):
        assert a[k].dtype == b[k].dtype == torch.float64
        p, q = (a[k], b[k]) if k.startswith(('pred', 'proj')) else (a[k][valid], b[k][valid])
        assert _maxdiff(p, q) <= 1e-12 * max(1., float(p.abs().max())), k


@pytest.mark.skipif(OFFICIAL_MISSING is not None, reason=str(OFFICIAL_MISSING))
@BOTH
def test_live_official_equivalence_float64(fast):
    """Float64 (train mode, dropout off, float32 masks as the official collate makes them): outputs at the valid
    positions and every loss within 1e-12 of the official model and criterion."""
    from videolights.loss import build_criterion
    sys.path.insert(0, str(REPO / 'tools' / 'official'))
    import train_probe as P
    chk = _checker()
    vo, off = chk.official_lib()
    flags = ['--dim_feedforward', '64', '--enc_layers', '1', '--dec_layers', '2', '--num_queries', '10',
             '--dropout', '0', '--input_dropout', '0', '--mr_to_hd_loss', '--hard_pos_neg_loss',
             '--contrastive_align_loss']
    opt = vo.make_opt(off, 'sf_clip_blip', flags)
    inputs, targets, _ = vo.synth_batch(off, opt, 'sf_clip_blip', 4, 0)
    inputs, targets = P.to_dtype(inputs, torch.float64), P.to_dtype(targets, torch.float64)
    dt, giou = (torch.get_default_dtype(),
                [(m, m.generalized_temporal_iou) for m in (off.span_utils, off.model, off.matcher)])
    torch.set_default_dtype(torch.float64)
    P._giou_in_input_dtype(off)   # the official GIoU casts to float32 (video_lights/span_utils.py); ours keeps float64
    try:
        vo.set_seed(1)
        m_off, crit_off, _ = vo.build(off, opt)
        m_off.double().train()
        cfg = get_preset('qvhighlights', dim_feedforward=64, enc_layers=1, dec_layers=2, num_queries=10, dropout=0.,
                         input_dropout=0., fra_dropout=0.)
        m_us = _build_from(load_official(m_off.state_dict(), cfg).double().train(), fast)
        for m in (m_off, m_us): P.no_dropout(m)
        a, b = m_off(**inputs), m_us(**inputs)
        lo, lu = crit_off(a, targets, 0), build_criterion(cfg).double()(b, targets, 0)
    finally:
        torch.set_default_dtype(dt)
        for m, f in giou: m.generalized_temporal_iou = f
    diffs = chk.compare_outputs({k: v.detach() for k, v in a.items() if torch.is_tensor(v)},
                                {k: v.detach() for k, v in b.items() if torch.is_tensor(v)}, inputs)
    assert max(diffs.values()) <= 1e-12, diffs
    rel = {k: abs(float(lo[k]) - float(lu[k])) / max(1., abs(float(lo[k]))) for k in lo if k.startswith('loss')}
    assert rel and max(rel.values()) <= 1e-12, rel


def _build_from(model, fast: bool):
    return accelerate(model) if fast else model


# parameter counts of the official model (commit 76308bb, random init), as measured by tools/check_official_model.py
OFFICIAL_PARAMS = {'qvhighlights': 10_796_263, 'qvhighlights_sf_clip': 10_399_975}


@pytest.mark.parametrize('preset', sorted(OFFICIAL_PARAMS))
def test_param_count_matches_official(preset):
    n = sum(p.numel() for p in build_model(get_preset(preset)).parameters())
    assert n == OFFICIAL_PARAMS[preset]


# ---------------------------------------------------------------- shapes and dtypes
@pytest.mark.parametrize('name', sorted(PRESETS))
def test_preset_output_shapes(name):
    cfg = get_preset(name)
    model = build_model(cfg).eval()
    B, lv, lq = 2, [min(cfg.max_v_l, 40), 9], [7, 3]
    with torch.no_grad():
        out = model(**random_inputs(cfg, B=B, lv=lv, lq=lq), return_attn=True)
    Nq, Lv, Lq = cfg.num_queries, max(lv), max(lq)
    assert out['pred_logits'].shape == (B, Nq, 2) and out['pred_spans'].shape == (B, Nq, 2)
    assert out['saliency_scores'].shape == (B, Lv) and 'saliency_scores_mr' not in out
    assert out['proj_queries'].shape == (B, Nq, cfg.contrastive_hdim)
    assert out['proj_txt_mem'].shape == (B, Lq, cfg.contrastive_hdim)
    assert out['proj_vid_mem'].shape == (B, Lv, cfg.contrastive_hdim)
    assert out['src_txt'].shape == (B, Lq, cfg.hidden_dim) and out['src_vid'].shape == (B, Lv, cfg.hidden_dim)
    assert out['video_mask'].shape == (B, Lv)
    assert len(out['aux_outputs']) == cfg.dec_layers - 1
    assert set(out['aux_outputs'][0]) >= {'pred_logits', 'pred_spans', 'proj_queries', 'proj_txt_mem'}
    assert 'saliency_scores_neg' not in out
    assert len(out['attn']) == 3 * cfg.bicmf_layers + cfg.enc_layers + 2 * cfg.dec_layers
    for k, v in out.items():
        if torch.is_tensor(v) and k != 'video_mask':
            assert v.dtype == torch.float32 and torch.isfinite(v).all(), k
    assert ((out['pred_spans'] >= 0) & (out['pred_spans'] <= 1)).all()


@BOTH
def test_training_mode_outputs_neg_and_eval_skip_is_exact(fast):
    cfg = VLConfig()
    model = _build(cfg, fast)
    inp = random_inputs(cfg, B=3, lv=[20, 32, 9], lq=[5, 16, 3])
    out = model.train()(**inp)
    assert out['saliency_scores_neg'].shape == (3, 32) and out['saliency_scores_mr'].shape == (3, 32)
    model.eval()
    with torch.no_grad():
        a, b = model(**inp), model(**inp, loss_outputs=True)
    assert 'saliency_scores_neg' not in a and 'saliency_scores_neg' in b
    assert 'saliency_scores_mr' not in a and 'saliency_scores_mr' in b
    vm = inp['src_vid_mask'].bool()
    for k in ('pred_logits', 'pred_spans'):
        assert _maxdiff(a[k], b[k]) <= 1e-6, k
    assert _maxdiff(a['saliency_scores'][vm], b['saliency_scores'][vm]) <= 1e-6  # padded positions: read by nothing


def test_bad_inputs_name_the_culprit():
    cfg = VLConfig()
    model = build_model(cfg).eval()
    inp = random_inputs(cfg, B=2)
    with pytest.raises(ValueError, match=r'src_txt has shape .* expected \(B, L, 12\)'):
        model(**{**inp, 'src_txt': inp['src_txt'][..., :4]})
    with pytest.raises(ValueError, match='src_txt_mask has shape'):
        model(**{**inp, 'src_txt_mask': inp['src_txt_mask'][:, :1]})
    bad = inp['src_vid_mask'].clone()
    bad[1, 0] = 0
    with pytest.raises(ValueError, match='src_vid_mask has a sample whose first position is padding'):
        model(**{**inp, 'src_vid_mask': bad})


# ---------------------------------------------------------------- padding invariance
def _pad(inp, extra_v, extra_q):
    "Append padded clips / tokens (zeros, mask 0) to every sample."
    out = dict(inp)
    for k, e in (('src_vid', extra_v), ('src_txt', extra_q)):
        B, L, D = inp[k].shape
        out[k] = torch.cat([inp[k], torch.zeros(B, e, D)], 1)
        out[k + '_mask'] = torch.cat([inp[k + '_mask'], torch.zeros(B, e)], 1)
    return out


VALID_KEYS = ['pred_logits', 'pred_spans', 'saliency_scores', 'saliency_scores_neg', 'proj_queries', 'src_vid']


@BOTH
@pytest.mark.parametrize('fixed', [False, True])
def test_extra_padding_changes_nothing(fixed, fast):
    """Appending padding to a batch leaves valid outputs unchanged, official mask quirk included (it only mixes existing
    masks)."""
    cfg = VLConfig(loss_outputs_eval=True, **({k: True for k in VLConfig().fixes} if fixed else {}))
    model = _build(cfg, fast).eval()
    inp = random_inputs(cfg, B=3, lv=[20, 32, 9], lq=[5, 16, 3], seed=1)
    with torch.no_grad():
        a, b = model(**inp), model(**_pad(inp, 7, 5))
    Lv = inp['src_vid'].shape[1]
    for k in VALID_KEYS:
        x, y = a[k], b[k][:, :Lv] if k.startswith('saliency') or k == 'src_vid' else b[k]
        assert _maxdiff(x, y) <= TOL, k
    mr = _maxdiff(a['saliency_scores_mr'], b['saliency_scores_mr'][:, :Lv])
    if fixed: assert mr <= TOL  # fix_mr_slice: per-sample length, GRU stops at the slice end
    # official slicing: the top-1 span is scaled by the padded length -> saliency_scores_mr may change (not asserted)


@BOTH
def test_single_vs_batch_needs_mask_fix(fast):
    """A sample alone == the same sample in a mixed-length batch with per-sample masks; not with the official Bi-CMF
    masks."""
    for fixed in (True, False):
        cfg = VLConfig(**({k: True for k in VLConfig().fixes} if fixed else {}))
        model = _build(cfg, fast).eval()
        inp = random_inputs(cfg, B=3, lv=[20, 32, 9], lq=[5, 16, 3], seed=2)
        with torch.no_grad():
            ob = model(**inp, loss_outputs=True)
            o1 = model(**{k: v[0:1, :(20 if 'vid' in k else 5)] for k, v in inp.items()},
                       loss_outputs=True)  # sample 0 alone
        d = max(_maxdiff(ob['pred_spans'][0], o1['pred_spans'][0]),
                _maxdiff(ob['saliency_scores'][0, :20], o1['saliency_scores'][0]))
        if fixed:
            assert d <= TOL
            assert _maxdiff(ob['saliency_scores_mr'][0, :20], o1['saliency_scores_mr'][0]) <= TOL
        else:
            # official masks: heads 2 of sample 0 read sample 2's mask, which blocks clips >= 9 x words >= 3
            assert d > 1e-4


# ---------------------------------------------------------------- gradients
# parameters that get no gradient in the official configuration, and why (08_convert: "Parameters the official training
# never moves")
NO_GRAD = [
    r'^txt_position_embed\.',                                # built but unused (use_txt_pos=False)
    r'^transformer\.t2v_encoder\.layers\.\d+\.norm2\.',      # defined but unused in the official Bi-CMF
    r'^transformer\.decoder\.layers\.0\.sa_(qcontent|kcontent|v)_proj\.weight$',  # layer-0 content input is zero
]
# gradients that are zero in exact arithmetic (a bias added to every key shifts all scores of a query equally)
ZERO_IN_THEORY = [r'^transformer\.decoder\.layers\.\d+\.(sa|ca)_k(content|pos)_proj\.bias$']
# under the REAL criterion (not the surrogate), on top of NO_GRAD and ZERO_IN_THEORY:
REAL_LOSS_NO_GRAD = [r'^contrastive_align_projection_vid\.']  # proj_vid_mem is returned, but no loss reads it
REAL_LOSS_ZERO_IN_THEORY = [
    # feeds only saliency_scores_mr -> task-coupled loss, whose min-shift cancels a constant
    r'^saliency_proj_mr\.bias$',
]
# official only, batch-dependent (official slicing): when every sample's top-1 slice is empty (negative start index),
# the GRU reads only zero padding, so its input weights get exactly zero gradient (weight_hh and biases still do)
REAL_LOSS_OFFICIAL_MAY_MISS = [r'^gru_extractor\.gru\.weight_ih_l0$']


@BOTH
@pytest.mark.parametrize('fixed', [False, True])
def test_every_parameter_gets_a_gradient(fixed, fast):
    "Surrogate loss over every output (training mode): exactly the documented parameters receive no gradient."
    cfg = VLConfig(**({k: True for k in VLConfig().fixes} if fixed else {}))
    torch.manual_seed(2)  # weights + dropout: a draw whose top-1 slices are not all empty (official slicing, see below)
    model = _build(cfg, fast).train()
    out = model(**random_inputs(cfg, B=3, lv=[20, 32, 9], lq=[5, 16, 3]))
    g = torch.Generator().manual_seed(0)
    flat = [v for k, v in out.items() if torch.is_tensor(v) and v.is_floating_point() and k != 'video_mask']
    flat += [v for a in out['aux_outputs'] for v in a.values()]
    sum((v * torch.randn(v.shape, generator=g)).sum() for v in flat).backward()
    expected = [re.compile(p) for p in NO_GRAD if not (fixed and 'norm2' in p)]
    zero_ok = [re.compile(p) for p in ZERO_IN_THEORY]
    for n, p in model.named_parameters():
        no_grad = p.grad is None or (p.grad == 0).all()
        if any(e.search(n) for e in expected): assert no_grad, f"{n} is documented as unused but got a gradient"
        elif not any(z.search(n) for z in zero_ok): assert not no_grad, f"{n} received no gradient"
        if p.grad is not None: assert torch.isfinite(p.grad).all(), n


@BOTH
@pytest.mark.parametrize('fixed', [False, True])
@pytest.mark.parametrize('seed', [0, 1])
def test_every_parameter_gets_a_gradient_from_the_real_loss(fixed, seed, fast):
    "Real criterion on a real-format batch: exactly the documented parameters get no (or a zero-in-theory) gradient."
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from test_overfit import real_batch
    from videolights.loss import build_criterion, total_loss
    cfg = get_preset('tiny', **({k: True for k in VLConfig().fixes} if fixed else {}))
    torch.manual_seed(seed)
    model, crit = _build(cfg, fast).train(), build_criterion(cfg)
    inputs, targets = real_batch(cfg, seed)
    total_loss(crit(model(**inputs), targets, epoch=3), crit.weight_dict).backward()
    none = [re.compile(p) for p in NO_GRAD + REAL_LOSS_NO_GRAD if not (fixed and 'norm2' in p)]
    tiny_ok = [re.compile(p) for p in ZERO_IN_THEORY + REAL_LOSS_ZERO_IN_THEORY]
    maybe = [re.compile(p) for p in REAL_LOSS_OFFICIAL_MAY_MISS] if not fixed else []
    gmax = max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)
    missed = []
    for n, p in model.named_parameters():
        g = 0. if p.grad is None else float(p.grad.abs().max())
        if any(e.search(n) for e in none): assert g == 0., f"{n} is documented as unused by the loss but got {g:.2e}"
        elif any(z.search(n) for z in tiny_ok): assert g <= 1e-6 * max(gmax, 1.), f"{n}: {g:.2e} should vanish"
        elif g == 0.:
            missed.append(n)
    assert all(any(m.search(n) for m in maybe) for n in missed), missed
    if fixed: assert float(model.gru_extractor.gru.weight_ih_l0.grad.abs().max()) > 0  # fix_mr_slice: never empty


@BOTH
@pytest.mark.parametrize('fix', ['fix_bicmf_mask_order', 'fix_bicmf_ffn_residual', 'fix_bicmf_text', 'fix_fra_corr',
                                 'fix_mr_slice'])
def test_each_model_fix_changes_the_computation(fix, fast):
    "Every model-side fix switch does something on a mixed-length batch (a silently ignored switch fails here)."
    inp = random_inputs(VLConfig(), B=3, lv=[20, 32, 9], lq=[5, 16, 3], seed=3)
    outs = []
    for on in (False, True):
        torch.manual_seed(0)
        m = _build(VLConfig(**{fix: on}), fast).eval()
        with torch.no_grad(): outs.append(m(**inp, loss_outputs=True))
    keys = ['pred_spans', 'saliency_scores', 'saliency_scores_neg', 'saliency_scores_mr']
    vm = inp['src_vid_mask'].bool()
    d = max(_maxdiff(outs[0][k][vm] if k.startswith('sal') else outs[0][k],
                     outs[1][k][vm] if k.startswith('sal') else outs[1][k]) for k in keys)
    assert d > 1e-5, (fix, d)


def test_uni_cmf_and_no_fra_build_and_differ():
    base = VLConfig()
    inp = random_inputs(base, B=2)
    outs = []
    for kw in ({}, dict(cmf='uni'), dict(use_fra=False)):
        torch.manual_seed(0)
        m = build_model(VLConfig(**kw)).eval()
        with torch.no_grad(): outs.append(m(**inp)['saliency_scores'])
    assert outs[0].shape == outs[1].shape == outs[2].shape
    assert _maxdiff(outs[0], outs[1]) > 1e-4 and _maxdiff(outs[0], outs[2]) > 1e-4


@BOTH
@pytest.mark.parametrize('fixed', [False, True])
def test_graphed_training_gives_gradients_to_the_eager_parameter_set(fixed, fast):
    """What the CUDA-graph backward computes (every output that requires grad, `detach_outputs` left out) reaches
    exactly the parameters the eager loss does: none gets a zero gradient where eager autograd gives it none."""
    from videolights.bench import synth_batch
    from videolights.loss import build_criterion, total_loss
    from videolights.accel import GraphedTraining, _StaticForward
    cfg = get_preset('qvhighlights', **({k: True for k in get_preset('qvhighlights').fixes} if fixed else {}))
    torch.manual_seed(0)
    m, crit = _build(cfg, fast).train(), build_criterion(cfg)
    mi, tg, _ = synth_batch(cfg, 3, seed=0)
    tg.setdefault('src_txt_mask', mi['src_txt_mask'])
    total_loss(crit(m(**mi), tg, 3), crit.weight_dict).backward()
    eager = {n for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    out = _StaticForward(m, GraphedTraining(m).detach)(*(mi[k]
                                                         for k in ('src_txt', 'src_txt_mask', 'src_vid',
                                                                   'src_vid_mask')))
    leaves = [o for o in torch.utils._pytree.tree_leaves(out) if o.requires_grad]
    (total_loss(crit(out, tg, 3), crit.weight_dict) + sum((o * 0).sum()
                                                          for o in leaves)).backward()  # as the graph would
    assert {n for n, p in m.named_parameters() if p.grad is not None} == eager
    assert 'contrastive_align_projection_vid.weight' not in eager  # no loss reads it: the reason for the default
