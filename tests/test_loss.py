"""Matcher and criterion: official numbers (fixture and, when present, the live official code), invariants,
brute-force cross-checks of every saliency/alignment term, the quirk fixes, gradients and vectorisation."""
import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import videolights.matcher as vm
from videolights.config import get_preset
from videolights.loss import (SetCriterion, align_vid_txt_loss, build_criterion, build_weight_dict, hard_loss_weight,
                              hard_pos_neg_losses, loss_saliency, margin_ranking_loss, minmax_l2, neg_pair_loss,
                              query_text_nce_loss, rank_contrastive_loss, saliency_terms, total_loss)
from videolights.matcher import HungarianMatcher

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / 'tests' / 'fixtures' / 'loss_official_qvh.pt'
sys.path.insert(0, str(ROOT / 'tools' / 'official'))
import official_harness  # noqa: E402  (finds the official checkout through $VIDEOLIGHTS_OFFICIAL)
OFFICIAL_MISSING = official_harness.missing()
CASE_OVERRIDES = {'official': {}, 'no_hard_pos_neg': dict(hard_pos_neg_loss=False),
                  'no_mr_to_hd': dict(mr_to_hd_loss=False), 'tvsum_mode': dict(use_matcher=False)}


@pytest.fixture(scope='module')
def fixture():
    return torch.load(FIXTURE, weights_only=True)


def close(a, b, tol=1e-5):
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


def clone_outputs(out, grad=False):
    res = {k: (v.clone().requires_grad_(grad and k != 'video_mask') if torch.is_tensor(v) else v)
           for k, v in out.items()}
    if 'aux_outputs' in out: res['aux_outputs'] = [clone_outputs(a, grad) for a in out['aux_outputs']]
    return res


# ---------------------------------------------------------------------------------------------------------------
# official numbers
# ---------------------------------------------------------------------------------------------------------------
def test_fixture_small_enough_and_plain():
    assert FIXTURE.stat().st_size < 2_000_000


@pytest.mark.parametrize('variant', ['sf_clip', 'sf_clip_blip'])
def test_matches_official_fixture(fixture, variant):
    fx, preset = fixture['fixtures'][variant], fixture['presets'][variant]
    out, targets = fx['outputs'], fx['targets']
    crit = build_criterion(get_preset(preset))
    assert {k: float(v) for k, v in crit.weight_dict.items()} == {k: float(v) for k, v in fx['weight_dict'].items()}
    for layer, ref in zip([out] + out['aux_outputs'], fx['indices']):
        for (i, j), (ri, rj) in zip(crit.matcher(layer, targets), ref):
            assert torch.equal(i, ri) and torch.equal(j, rj)
    n_checked = 0
    for name, ref in fx['losses'].items():
        case, ep = name.split('@e')
        got = build_criterion(get_preset(preset, **CASE_OVERRIDES[case]))(clone_outputs(out), targets, epoch=int(ep))
        assert sorted(got) == sorted(ref), name
        for k, v in ref.items():
            assert close(got[k], v), (name, k, float(got[k]), v)
            n_checked += 1
    assert n_checked > 50


def test_fixture_detects_a_wrong_coefficient(fixture):
    "The fixture comparison can fail: a different hard pos/neg coefficient changes loss_saliency at epoch 5."
    fx = fixture['fixtures']['sf_clip']
    got = build_criterion(get_preset('qvhighlights_sf_clip', hard_pos_neg_loss_coef=9.))(clone_outputs(fx['outputs']),
            fx['targets'], epoch=5)
    assert not close(got['loss_saliency'], fx['losses']['official@e5']['loss_saliency'])


@pytest.mark.skipif(OFFICIAL_MISSING is not None, reason=str(OFFICIAL_MISSING))
def test_matches_live_official():
    spec = importlib.util.spec_from_file_location('check_official_loss', ROOT / 'tools' / 'check_official_loss.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(['--epochs', '0', '5', '--seed', '11']) == 0


# ---------------------------------------------------------------------------------------------------------------
# a tiny batch for the invariants
# ---------------------------------------------------------------------------------------------------------------
def tiny(seed=0, B=3, Nq=5, Lv=9, Lq=6, Dc=4, D=8, K=3):
    g = torch.Generator().manual_seed(seed)
    n_clips, n_tok = [9, 7, 5][:B], [6, 4, 3][:B]
    vmask = torch.stack([(torch.arange(Lv) < n).float() for n in n_clips])
    tmask = torch.stack([(torch.arange(Lq) < n).float() for n in n_tok])
    labels = torch.randint(0, 13, (B, Lv), generator=g).float() * (torch.rand(B, Lv, generator=g) > 0.4) * vmask
    labels[:, 1] = 6.  # every sample has a relevant clip
    def layer():
        return dict(pred_logits=torch.randn(B, Nq, 2, generator=g),
                    pred_spans=torch.rand(B, Nq, 2, generator=g) * 0.4 + 0.1,
                    proj_queries=F.normalize(torch.randn(B, Nq, Dc, generator=g), dim=-1),
                    proj_txt_mem=F.normalize(torch.randn(B, Lq, Dc, generator=g), dim=-1))
    out = dict(layer(), saliency_scores=torch.randn(B, Lv, generator=g),
               saliency_scores_neg=torch.randn(B, Lv, generator=g),
               saliency_scores_mr=torch.randn(B, Lv, generator=g), video_mask=vmask, txt_mask=tmask,
               src_txt=torch.randn(B, Lq, D, generator=g), src_vid=torch.randn(B, Lv, D, generator=g),
               aux_outputs=[layer() for _ in range(K - 1)])
    span_labels = [dict(spans=torch.rand(n, 2, generator=g) * 0.3 + 0.1) for n in (2, 1, 3)][:B]
    pos = torch.tensor([[1, 3], [1, 4], [1, 2]])[:B]  # (B, P) clip indices inside each sample's valid clips
    neg = torch.tensor([[0, 5], [2, 6], [3, 4]])[:B]
    targets = dict(span_labels=span_labels, saliency_pos_labels=pos, saliency_neg_labels=neg,
                   saliency_all_labels=labels, saliency_pos_index=(labels > 0).float())
    return out, targets


CFG = dict(dec_layers=3, hidden_dim=32, nheads=4)


def test_zero_span_loss_when_prediction_equals_target():
    out, targets = tiny()
    for b, t in enumerate(targets['span_labels']):  # put the targets into the first n_b queries, all layers
        for o in [out] + out['aux_outputs']:
            o['pred_spans'][b, :len(t['spans'])] = t['spans']
            o['pred_logits'][b] = torch.tensor([0., 0.])
            o['pred_logits'][b, :len(t['spans'])] = torch.tensor([3., 0.])
    losses = build_criterion(get_preset('qvhighlights', **CFG))(out, targets)
    for k in ('loss_span', 'loss_giou', 'loss_span_0', 'loss_giou_0', 'loss_span_1', 'loss_giou_1'):
        assert abs(float(losses[k])) < 1e-6, (k, float(losses[k]))
    out['pred_spans'][0, 0, 0] += 0.1  # and it is not zero otherwise
    assert float(build_criterion(get_preset('qvhighlights', **CFG))(out, targets)['loss_span']) > 0


@pytest.mark.parametrize('preset', ['qvhighlights', 'fixed'])
def test_invariant_to_permuting_queries(preset):
    out, targets = tiny(1)
    crit = build_criterion(get_preset(preset, **CFG))
    ref = crit(clone_outputs(out), targets, epoch=2)
    perm = torch.tensor([3, 0, 4, 2, 1])
    def p(o): return {k: (v[:, perm] if k in ('pred_logits', 'pred_spans', 'proj_queries') else v)
                      for k, v in o.items()}
    got = crit(dict(p(out), aux_outputs=[p(a) for a in out['aux_outputs']]), targets, epoch=2)
    assert sorted(got) == sorted(ref)
    for k in ref: assert close(got[k], ref[k]), k


def test_tvsum_mode_is_the_saliency_bundle_only(monkeypatch):
    out, targets = tiny(2)
    full = build_criterion(get_preset('qvhighlights', **CFG))(clone_outputs(out), targets, epoch=4)
    tv = build_criterion(get_preset('tvsum', **CFG, hard_pos_neg_loss_coef=10.))
    monkeypatch.setattr(tv.matcher, 'forward', lambda *a, **k: pytest.fail('TVSum mode must not match'))
    got = tv(out, targets, epoch=4)
    assert list(got) == ['loss_saliency']
    assert close(got['loss_saliency'], full['loss_saliency'])
    # dset_name='tvsum' alone also switches the matcher off (as the official build_model)
    assert not build_criterion(get_preset('qvhighlights', dset_name='tvsum')).use_matcher
    assert total_loss(got, tv.weight_dict).shape == ()


def test_weight_dict_and_total():
    w = build_weight_dict(get_preset('qvhighlights'))
    assert w['loss_span'] == 10 and w['loss_label'] == 4 and w['loss_contrastive_align_1'] == 0.2
    assert 'loss_saliency_0' not in w and 'loss_span_2' not in w
    assert 'loss_span_0' not in build_weight_dict(get_preset('qvhighlights', aux_loss=False))
    assert 'loss_contrastive_align' not in build_weight_dict(get_preset('qvhighlights', contrastive_align_loss=False))
    d = dict(loss_span=torch.tensor(2.), loss_giou=torch.tensor(1.), class_error=torch.tensor(50.))
    assert float(total_loss(d, dict(loss_span=10., loss_giou=1.))) == 21.


def test_gradients_flow():
    out, targets = tiny(3)
    o = clone_outputs(out, grad=True)
    crit = build_criterion(get_preset('qvhighlights', **CFG))
    total_loss(crit(o, targets, epoch=1), crit.weight_dict).backward()
    for k in ('pred_logits', 'pred_spans', 'saliency_scores', 'saliency_scores_neg', 'saliency_scores_mr',
              'proj_queries', 'proj_txt_mem', 'src_txt', 'src_vid'):
        assert o[k].grad is not None and torch.isfinite(o[k].grad).all() and o[k].grad.abs().sum() > 0, k
    for a in o['aux_outputs']:
        for k in ('pred_logits', 'pred_spans', 'proj_queries'): assert a[k].grad.abs().sum() > 0, k


def test_matcher_vectorised_one_cost_per_layer(monkeypatch):
    calls = []
    orig = vm.match_cost
    def counting(*a, **k):
        calls.append(a[0].shape[0])
        return orig(*a, **k)
    monkeypatch.setattr(vm, 'match_cost', counting)
    out, targets = tiny(4)
    HungarianMatcher()(out, targets)
    assert calls == [3]  # one call for the whole batch of 3
    calls.clear()
    build_criterion(get_preset('qvhighlights', **CFG))(out, targets)
    assert calls == [3, 3, 3]  # one per decoder layer (last + 2 aux)


def test_empty_targets_are_finite():
    out, targets = tiny(5)
    targets['span_labels'][1] = dict(spans=torch.zeros(0, 2))
    losses = build_criterion(get_preset('qvhighlights', **CFG))(out, targets)
    assert all(torch.isfinite(v).all() for v in losses.values())
    targets['span_labels'] = [dict(spans=torch.zeros(0, 2)) for _ in range(3)]
    losses = build_criterion(get_preset('qvhighlights', **CFG))(out, targets)
    assert float(losses['loss_span']) == 0 and all(torch.isfinite(v).all() for v in losses.values())


def test_no_saliency_labels_gives_zero_bundle():
    out, targets = tiny(6)
    t = {k: v for k, v in targets.items() if k == 'span_labels'}
    assert float(loss_saliency(out, t)['loss_saliency']) == 0.


def test_bad_input_errors():
    out, targets = tiny(7)
    with pytest.raises(KeyError, match='unknown loss'):
        SetCriterion(HungarianMatcher(), {}, dict(boxes={}))
    with pytest.raises(ValueError, match='span_labels for a batch of 3'):
        HungarianMatcher()(out, dict(span_labels=targets['span_labels'][:2]))
    crit = build_criterion(get_preset('fixed', **CFG))
    with pytest.warns(UserWarning, match="outputs\\['txt_mask'\\]"):
        crit({k: v for k, v in out.items() if k != 'txt_mask'}, targets)
    # the mask may also come with the targets
    o = {k: v for k, v in out.items() if k != 'txt_mask'}
    assert torch.isfinite(crit(o, dict(targets, src_txt_mask=out['txt_mask']))['loss_contrastive_align'])


# ---------------------------------------------------------------------------------------------------------------
# brute force: every saliency / alignment term with plain Python loops
# ---------------------------------------------------------------------------------------------------------------
def bf_margin(s, pos, neg, margin):
    B, P = len(pos), len(pos[0])
    return sum(max(0., margin + s[b][neg[b][k]] - s[b][pos[b][k]]) for b in range(B) for k in range(P)) * 2 / (B * P)


def bf_rank(s, sn, y, m, tau=0.5):
    B, L = len(s), len(s[0])
    total = 0.
    for r in range(1, 12):
        if not any(y[b][t] >= r for b in range(B) for t in range(L)): continue
        acc = 0.
        for b in range(B):
            row = [(s[b][t] if m[b][t] else -1e3) / tau for t in range(L)] + [(sn[b][t] if m[b][t] else -1e3) / tau
                    for t in range(L)]
            lse = math.log(sum(math.exp(v - max(row)) for v in row)) + max(row)
            pos = [t for t in range(L) if y[b][t] >= r and m[b][t]]
            if pos: acc += -sum(row[t] - lse for t in pos) / len(pos)
        total += acc / B
    return total / 12


def bf_neg_pair(sn, m):
    return sum(-math.log(1 - 1 / (1 + math.exp(-sn[b][t]))) * m[b][t] for b in range(len(sn))
               for t in range(len(sn[0]))) / len(sn)


def bf_profile(x, y, m=None, sample_min=False):
    "n(x) with plain loops; m=None: official batch-global min over all entries."
    B, L = len(x), len(x[0])
    valid = [[(m is None) or bool(m[b][t]) for t in range(L)] for b in range(B)]
    gmin = min(x[b][t] for b in range(B) for t in range(L) if valid[b][t])
    rng = max(map(max, y)) - min(map(min, y))
    rows = []
    for b in range(B):
        mn = min(x[b][t] for t in range(L) if valid[b][t]) if sample_min else gmin
        z = [((x[b][t] - mn) / rng) if valid[b][t] else 0. for t in range(L)]
        n = math.sqrt(sum(v * v for v in z)) or 1.
        rows.append([v / n for v in z])
    return rows


def bf_cos_loss(pn, y, batch_mean=False):
    errs = []
    for p, yy in zip(pn, y):
        ny = math.sqrt(sum(v * v for v in yy))
        errs.append(1 - sum(a * b / ny for a, b in zip(p, yy)))
    return sum(errs) / (len(errs) if batch_mean else 1)


def bf_hard(pn, y, p, weight, m=None):
    B, L = len(pn), len(pn[0])
    ny = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in y]
    den = B * L if m is None else sum(map(sum, m))
    w = (lambda b, t: 1.) if m is None else (lambda b, t: m[b][t])
    neg = sum(w(b, t) * ((ny[b][t] - pn[b][t]) ** 2 if not p[b][t] else 0.) for b in range(B) for t in range(L)) / den
    pos = sum(w(b, t) * ((ny[b][t] - pn[b][t]) ** 2 if p[b][t] else 0.) for b in range(B) for t in range(L)) / den
    return neg * weight, pos * weight


def bf_nce(q, txt, indices, temp, tmask=None):
    B, Nq, Lq = len(q), len(q[0]), len(txt[0])
    total = 0.
    for b in range(B):
        logit = [sum(sum(a * c for a, c in zip(q[b][i], txt[b][j])) for j in range(Lq)
                     if tmask is None or tmask[b][j]) / temp
                 for i in range(Nq)]
        pos = indices[b][0].tolist()
        lse = math.log(sum(math.exp(v - max(logit)) for v in logit)) + max(logit)
        total += -sum(logit[i] for i in pos) / max(1, len(pos)) + lse
    return total / B


def bf_align(txt, vid, y, tmask=None, vmask=None, sample_min=False, batch_mean=False):
    B, Lq, Lv = len(txt), len(txt[0]), len(vid[0])
    c = []
    for b in range(B):
        toks = [j for j in range(Lq) if tmask is None or tmask[b][j]]
        sent = [sum(txt[b][j][d] for j in toks) / len(toks) for d in range(len(txt[b][0]))]
        ns = math.sqrt(sum(v * v for v in sent))
        c.append([sum(a * v for a, v in zip(sent, vid[b][t])) / (ns * math.sqrt(sum(v * v for v in vid[b][t])))
                  for t in range(Lv)])
    return bf_cos_loss(bf_profile(c, y, vmask, sample_min), y, batch_mean)


def L(t): return t.tolist()


def test_margin_ranking_brute_force():
    out, t = tiny(8)
    got = margin_ranking_loss(out['saliency_scores'], t['saliency_pos_labels'], t['saliency_neg_labels'], 0.2)
    assert close(got, bf_margin(L(out['saliency_scores']), L(t['saliency_pos_labels']), L(t['saliency_neg_labels']),
                                0.2))


def test_rank_contrastive_brute_force():
    out, t = tiny(9)
    got = rank_contrastive_loss(out['saliency_scores'], out['saliency_scores_neg'], t['saliency_all_labels'],
                                out['video_mask'])
    ref = bf_rank(L(out['saliency_scores']), L(out['saliency_scores_neg']), L(t['saliency_all_labels']),
                  L(out['video_mask']))
    assert close(got, ref), (float(got), ref)


def bf_rank_eps(s, sn, y, m, tau=0.5):
    "The official formula with its two 1e-6 terms, in Python floats (float64)."
    B, L = len(s), len(s[0])
    total = 0.
    for r in range(1, 12):
        if not any(y[b][t] >= r for b in range(B) for t in range(L)): continue
        acc = 0.
        for b in range(B):
            row = [(x[b][t] if m[b][t] else -1e3) / tau for x in (s, sn) for t in range(L)]
            z = [v - max(row) for v in row]
            lse = math.log(sum(math.exp(v) for v in z) + 1e-6)
            pos = [t for t in range(L) if y[b][t] >= r]
            acc += -sum((z[t] - lse) * m[b][t] for t in pos) / (len(pos) + 1e-6)
        total += acc / B
    return total / 12


def test_rank_contrastive_float64_has_no_float32_step():
    "Float64 scores stay float64 throughout (the positive counts + 1e-6 too): equal to the float64 formula to 1e-13."
    out, t = tiny(9)
    s, sn, y = (x.double() for x in (out['saliency_scores'], out['saliency_scores_neg'], t['saliency_all_labels']))
    got = rank_contrastive_loss(s, sn, y, out['video_mask'])
    ref = bf_rank_eps(L(s), L(sn), L(y), L(out['video_mask']))
    assert got.dtype == torch.float64 and abs(float(got) - ref) <= 1e-13 * abs(ref), (float(got), ref)


def test_neg_pair_brute_force():
    out, _ = tiny(10)
    assert close(neg_pair_loss(out['saliency_scores_neg'], out['video_mask']),
                 bf_neg_pair(L(out['saliency_scores_neg']), L(out['video_mask'])))


@pytest.mark.parametrize('mask,sample_min,batch_mean',
                         [(False, False, False), (True, False, False), (True, True, True)])
def test_profile_cosine_terms_brute_force(mask, sample_min, batch_mean):
    out, t = tiny(11)
    m = out['video_mask'] if mask else None
    y = t['saliency_all_labels']
    for key, coef_key in (('saliency_scores', 'cos_sim'), ('saliency_scores_mr', 'task_coupled')):
        ref_prof = bf_profile(L(out[key]), L(y), L(m) if mask else None, sample_min)
        assert torch.allclose(minmax_l2(out[key], y, m, sample_min), torch.tensor(ref_prof), atol=1e-6)
        terms = saliency_terms(out, t, 0, cos_sim_loss_coef=0.5, mr_to_hd_loss_coef=2., mask_padding=mask,
                               sample_min=sample_min, batch_mean=batch_mean)
        coef = 0.5 if coef_key == 'cos_sim' else 2.
        assert close(terms[coef_key], coef * bf_cos_loss(ref_prof, L(y), batch_mean)), coef_key


@pytest.mark.parametrize('mask', [False, True])
def test_hard_pos_neg_brute_force(mask):
    out, t = tiny(12)
    m = out['video_mask'] if mask else None
    y = t['saliency_all_labels']
    prof = bf_profile(L(out['saliency_scores']), L(y), L(m) if mask else None)
    ref = bf_hard(prof, L(y), L(t['saliency_pos_index']), hard_loss_weight(5, 10.), L(m) if mask else None)
    terms = saliency_terms(out, t, 5, mask_padding=mask)
    assert close(terms['hard_neg'], ref[0]) and close(terms['hard_pos'], ref[1])
    got = hard_pos_neg_losses(minmax_l2(out['saliency_scores'], y, m), F.normalize(y, dim=1), t['saliency_pos_index'],
                              60., m)
    assert close(got[0], ref[0]) and close(got[1], ref[1])


def test_hard_ramp():
    assert [hard_loss_weight(e, 10.) for e in (0, 4, 199)] == [10., 50., 2000.]
    assert hard_loss_weight(199, 10., bounded=True, ramp_max=10) == 100.
    out, t = tiny(13)
    a = saliency_terms(out, t, 0)['hard_pos']
    b = saliency_terms(out, t, 9)['hard_pos']
    assert close(b, 10 * a)


@pytest.mark.parametrize('tmask', [False, True])
def test_nce_brute_force(tmask):
    out, t = tiny(14)
    idx = HungarianMatcher()(out, t)
    tm = out['txt_mask'] if tmask else None
    got = query_text_nce_loss(out['proj_queries'], out['proj_txt_mem'], idx, 0.07, tm)
    assert close(got, bf_nce(L(out['proj_queries']), L(out['proj_txt_mem']), idx, 0.07, L(tm) if tmask else None))


@pytest.mark.parametrize('fix', [False, True])
def test_align_brute_force(fix):
    out, t = tiny(15)
    tm, vmk = (out['txt_mask'], out['video_mask']) if fix else (None, None)
    got = align_vid_txt_loss(out['src_txt'], out['src_vid'], t['saliency_all_labels'], tm, vmk, fix, fix)
    ref = bf_align(L(out['src_txt']), L(out['src_vid']), L(t['saliency_all_labels']), L(tm) if fix else None,
                   L(vmk) if fix else None, fix, fix)
    assert close(got, ref), (float(got), ref)


def test_bundle_is_sum_of_terms():
    out, t = tiny(16)
    terms = saliency_terms(out, t, 3)
    assert close(loss_saliency(out, t, epoch=3)['loss_saliency'], sum(float(v) for v in terms.values()))
    off = saliency_terms(out, t, 3, cos_sim_loss=False, mr_to_hd_loss=False, hard_pos_neg_loss=False)
    assert [float(off[k]) for k in ('cos_sim', 'task_coupled', 'hard_neg', 'hard_pos')] == [0., 0., 0., 0.]


# ---------------------------------------------------------------------------------------------------------------
# quirk fixes
# ---------------------------------------------------------------------------------------------------------------
def perturb_padding(out):
    "Change every padded clip and token of the outputs: the fixed losses must not see it."
    o = clone_outputs(out)
    pad_v, pad_t = o['video_mask'] == 0, o['txt_mask'] == 0
    for k in ('saliency_scores', 'saliency_scores_mr'): o[k][pad_v] = 7.
    o['src_vid'][pad_v] = 3.
    o['src_txt'][pad_t] = -2.
    for layer in [o] + o['aux_outputs']:
        layer['proj_txt_mem'][pad_t] = F.normalize(torch.ones(layer['proj_txt_mem'].shape[-1]), dim=0)
    return o


def test_fixed_preset_ignores_padding_official_does_not():
    out, t = tiny(17)
    fixed = build_criterion(get_preset('fixed', **CFG))
    a, b = fixed(clone_outputs(out), t, epoch=2), fixed(perturb_padding(out), t, epoch=2)
    for k in a: assert close(a[k], b[k]), k
    off = build_criterion(get_preset('qvhighlights', **CFG))
    a, b = off(clone_outputs(out), t, epoch=2), off(perturb_padding(out), t, epoch=2)
    assert not close(a['loss_saliency'], b['loss_saliency']) and not close(a['loss_contrastive_align'],
            b['loss_contrastive_align'])


def cat_batch(out, t):
    "The batch concatenated with itself (B -> 2B)."
    def cat(o): return {k: (torch.cat([v, v]) if torch.is_tensor(v) else v) for k, v in o.items()}
    o = dict(cat(out), aux_outputs=[cat(a) for a in out['aux_outputs']])
    tt = {k: (torch.cat([v, v]) if torch.is_tensor(v) else v + v) for k, v in t.items()}
    return o, tt


def test_fixed_losses_do_not_scale_with_batch_size():
    out, t = tiny(18)
    o2, t2 = cat_batch(out, t)
    fixed = build_criterion(get_preset('fixed', **CFG))
    a, b = fixed(clone_outputs(out), t, epoch=1), fixed(o2, t2, epoch=1)
    for k in a: assert close(a[k], b[k]), k
    off = build_criterion(get_preset('qvhighlights', **CFG))
    # official: the batch-summed cosine terms double (the ranking/NCE/hard terms are means and stay)
    ta, tb = saliency_terms(out, t, 1), saliency_terms(o2, t2, 1)
    assert close(tb['cos_sim'], 2 * ta['cos_sim']) and close(tb['task_coupled'], 2 * ta['task_coupled'])
    assert not close(off(clone_outputs(out), t)['loss_saliency'], off(o2, t2)['loss_saliency'])


def test_fix_switches_are_read_from_config():
    crit = build_criterion(get_preset('fixed'))
    sal, ca = crit.losses['saliency'], crit.losses['contrastive_align']
    assert sal['mask_padding'] and sal['sample_min'] and sal['batch_mean'] and sal['bounded_ramp']
    assert ca['mask_text'] and ca['mask_padding']
    off = build_criterion(get_preset('qvhighlights'))
    assert not any(off.losses['saliency'][k] for k in ('mask_padding', 'sample_min', 'batch_mean', 'bounded_ramp'))
    assert not off.losses['contrastive_align']['mask_text']


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_matches_cpu(fixture):
    fx = fixture['fixtures']['sf_clip_blip']
    def to(o, dev):
        if isinstance(o, dict): return {k: to(v, dev) for k, v in o.items()}
        if isinstance(o, list): return [to(v, dev) for v in o]
        return o.to(dev) if torch.is_tensor(o) else o
    crit = build_criterion(get_preset('qvhighlights'))
    ref = crit(clone_outputs(fx['outputs']), fx['targets'], epoch=5)
    got = crit(to(fx['outputs'], 'cuda'), to(fx['targets'], 'cuda'), epoch=5)
    for k in ref: assert close(got[k].cpu(), ref[k], 1e-4), k


@pytest.mark.parametrize('preset', ['tiny', 'fixed'])
def test_real_model_end_to_end(preset):
    "Our model's output dict goes through the criterion; the loss is finite and every trainable head gets a gradient."
    from videolights.model import build_model
    from videolights.config import VLConfig
    cfg = get_preset('tiny', **({} if preset == 'tiny'
                                else {k: True for k in VLConfig().fixes}))  # tiny dims, all fixes on
    torch.manual_seed(0)
    model = build_model(cfg).train()
    B, Lv, Lq = 3, 12, 6
    vmask = torch.stack([(torch.arange(Lv) < n).float() for n in (12, 9, 7)])
    tmask = torch.stack([(torch.arange(Lq) < n).float() for n in (6, 4, 5)])
    inputs = dict(src_txt=torch.randn(B, Lq, cfg.t_feat_dim) * tmask[..., None], src_txt_mask=tmask,
                  src_vid=torch.randn(B, Lv, cfg.v_feat_dim) * vmask[..., None], src_vid_mask=vmask)
    labels = torch.zeros(B, Lv)
    labels[0, 2:5] = torch.tensor([4., 12., 8.])
    labels[1, 0:2] = 3.
    labels[2, 5:7] = 6.
    targets = dict(span_labels=[dict(spans=torch.tensor([[0.29, 0.25]])), dict(spans=torch.tensor([[0.11, 0.22]])),
                                dict(spans=torch.tensor([[0.86, 0.29]]))],
                   saliency_pos_labels=torch.tensor([[3, 2], [0, 1], [5, 6]]),
                   saliency_neg_labels=torch.tensor([[0, 8], [5, 3], [0, 1]]),
                   saliency_all_labels=labels, saliency_pos_index=(labels > 0).float(), src_txt_mask=tmask)
    crit = build_criterion(cfg)
    out = model(**inputs)
    losses = crit(out, targets, epoch=3)
    assert set(crit.weight_dict) <= set(losses)
    loss = total_loss(losses, crit.weight_dict)
    assert torch.isfinite(loss)
    loss.backward()
    for name in ('class_embed', 'span_embed', 'saliency_proj1', 'contrastive_align_projection_query'):
        mod = getattr(model, name)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters()), name


def test_eval_outputs_without_negative_pass():
    "Eval-mode outputs have no saliency_scores_neg: the rank term uses the real clips only, the neg-pair term is 0."
    out, t = tiny(19)
    o = {k: v for k, v in out.items() if k != 'saliency_scores_neg'}
    terms = saliency_terms(o, t, 0)
    assert float(terms['neg_pair']) == 0.
    B, Lv = out['saliency_scores'].shape
    ref = bf_rank(L(out['saliency_scores']), [[-1e9] * Lv for _ in range(B)], L(t['saliency_all_labels']),
                  L(out['video_mask']))
    assert close(terms['rank_contrastive'], ref)
    losses = build_criterion(get_preset('qvhighlights', **CFG))(o, t)
    assert all(torch.isfinite(v).all() for v in losses.values())


@pytest.mark.parametrize('preset', ['qvhighlights', 'fixed'])
def test_flat_match_indices_give_the_same_losses(fixture, preset):
    "The matcher's flat device copies (`MatchIndices`) vs the plain per-sample pairs: every loss term bit for bit."
    fx = fixture['fixtures']['sf_clip_blip']
    crit = build_criterion(get_preset(preset))
    flat = crit(clone_outputs(fx['outputs']), fx['targets'], epoch=5)
    matcher = crit.matcher
    class Plain(torch.nn.Module):
        def forward(self, o, t): return list(matcher(o, t))                  # drops the flat copies
    crit.matcher = Plain()
    plain = crit(clone_outputs(fx['outputs']), fx['targets'], epoch=5)
    assert set(flat) == set(plain) and len(flat) > 10
    for k in flat: assert torch.equal(flat[k], plain[k]), k
