"""Run the official `video_lights/inference.py` on checkpoints and record what it writes: the probe of
tools/check_official_infer.py (run in the official environment: `python infer_probe.py CONFIG.json`).

For every run of CONFIG['runs'] (`resume`, `split`, `eval_path`, optional `nms_thd`) it calls the script's
`start_inference(split=..., splitfile=...)`, as its `__main__` block does, with the command line the official
`scripts/*/inference.sh` builds (`--resume CKPT --eval_split_name SPLIT --eval_path FILE`), plus `--nms_thd T` where
the run asks for it (the script's `__main__` unpacks exactly six arguments, so NMS is reached through the function it
calls) and `--num_workers 0` (the loader only). Its options come from `opt.json` beside the checkpoint, as always;
its files land in that file's `results_dir`, from where the probe moves the files of each run to the run's
`official_out` folder. Run-time changes, none of which edits an official file: the harness's CPU rules
(`Tensor.cuda` as identity, `argparse.Namespace` allowed in checkpoints), no pandas for the options table,
and a wrapper of the model's forward that records its raw outputs: the saliency scores of every query
(`saliency_{split}.json`; TVSum writes no submission, its mAP is computed on them) and, per batch, the outputs the
inference decodes with the batch's video mask (`raw_{split}.pt`), both beside the run's files. A run with `glove`
(the Charades-STA VGG variant, whose loader embeds the query words with torchtext's GloVe 6B-300d) gets a stand-in
vocabulary read from that .npz (`words`, `vectors`) in place of the download.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

RAW = ('pred_logits', 'pred_spans', 'saliency_scores')   # the model outputs the inference decodes


class _StandInVocab:
    "What the official loader uses of a torchtext GloVe vocabulary (`itos`, `stoi`, `vectors`, `dim`), from an .npz."
    def __init__(self, path):
        import numpy as np
        z = np.load(path)
        self.itos = [str(w) for w in z['words']]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.vectors = torch.from_numpy(z['vectors'])
        self.dim = self.vectors.shape[1]

    @classmethod
    def aliases(cls, path):
        "A stand-in of the `torchtext.vocab` module: `pretrained_aliases['glove.6B.300d']()` builds the vocabulary."
        import types
        return types.SimpleNamespace(pretrained_aliases={'glove.6B.300d': lambda: cls(path)})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = json.loads(Path(argv[0]).read_text())
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    import official_harness as H
    import train_probe as P
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())))
    off = H.load(cfg['official'], extra=('video_lights.train', 'video_lights.inference'))
    I = off.inference
    P._no_pandas(off)
    seen = {}

    dataset_module = sys.modules[I.StartEndDataset.__module__]

    class Dataset(I.StartEndDataset):   # remembers the eval dataset, to name the queries in its order
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen['ds'] = self
    I.StartEndDataset = Dataset

    real_setup = I.setup_model
    def setup(opt):
        model, crit, o, s = real_setup(opt)
        if opt.device.type == 'cpu': H.on_cpu(model)
        fwd = model.forward
        def forward(*a, **k):
            out = fwd(*a, **k)
            mask = k['src_vid_mask']
            for row, m in zip(out['saliency_scores'].detach().float().cpu(), mask.cpu()):
                seen['sal'].append(row[:int(m.sum())].tolist())
            seen['raw'].append(dict({n: out[n].detach().cpu().clone() for n in RAW if n in out},
                                    src_vid_mask=mask.detach().cpu().clone()))
            return out
        model.forward = forward
        return model, crit, o, s
    I.setup_model = setup

    done = []
    for run in cfg['runs']:
        seen['sal'], seen['raw'] = [], []
        if run.get('glove'): dataset_module.vocab = _StandInVocab.aliases(run['glove'])
        sys.argv = ['inference.py', '--resume', run['resume'], '--eval_split_name', run['split'],
                    '--eval_path', run['eval_path'], '--num_workers', '0']
        if run.get('nms_thd') is not None: sys.argv += ['--nms_thd', str(run['nms_thd'])]
        results = Path(json.loads((Path(run['resume']).parent / 'opt.json').read_text())['results_dir'])
        before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()} if results.is_dir() else {}
        I.start_inference(split=run['split'], splitfile=run['eval_path'])
        new = sorted(p.name for p in results.iterdir() if before.get(p.name) != p.stat().st_mtime_ns)
        dest = Path(run['official_out'])
        dest.mkdir(parents=True, exist_ok=True)
        for name in new: os.replace(results / name, dest / name)   # the next run may write the same names
        qids = [d['qid'] for d in seen['ds'].data]
        if len(qids) != len(seen['sal']):
            raise RuntimeError(f"{len(seen['sal'])} saliency rows recorded for {len(qids)} queries")
        (dest / f"saliency_{run['split']}.json").write_text(json.dumps(dict(zip(map(str, qids), seen['sal']))))
        torch.save(seen['raw'], dest / f"raw_{run['split']}.pt")
        done.append(dict(run, results_dir=str(results), files=new))
    (Path(cfg['out']) / 'infer_probe.json').write_text(json.dumps(done, indent=1))


if __name__ == '__main__':
    main()
