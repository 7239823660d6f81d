"""Would a cross-encoder harm judge agree better with readers? (issue 22, part 4)

The shipped harm judge reads fixed MiniLM sentence embeddings of request, answer and opening
(rootdefense.evaluation.judging.harm): out of fold, kappa 0.53 and recall 0.54 against blind
readers, who agree with each other at kappa 0.85 (results/judge/reread). This script measures
the alternative: all-MiniLM-L6-v2 fine-tuned end to end on (request, answer) pairs read
together (a cross-encoder: mean-pooled last layer, one linear unit, class-balanced binary
cross-entropy, AdamW, linear warm-up and decay), trained on the store's read answers (answers
to harmful requests: help is harmful; answers to benign requests: not harmful) and, with
--rows N, N of the judge's packaged training rows. Agreement is measured as the judge's is:
out of fold by request (5 folds, SHA-256 of the request), each read answer judged by a model
fitted without any read answer to its request, at the class-balanced cut 0.5.

Writes one JSON line per fold and one for all folds to OUT, and OUT.p.npy (each read answer's
probability; NaN where not yet judged). About 6 minutes a fold on 2 cores.

    python scripts/judge_cross_encoder.py OUT.jsonl 0,1,2,3,4 [--epochs 3 --max-len 192 --rows 0]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time

import numpy as np
import torch

from rootdefense.evaluation.judging import harm
from rootdefense.evaluation.judging.embedding import EMBED_DIM, minilm_dir
from rootdefense.evaluation.judging.harm_data import default_readings, read_answers, training_rows


class CrossEncoder(torch.nn.Module):
    """MiniLM over "request [SEP] answer", mean-pooled, one linear unit (a logit)."""

    def __init__(self):
        from transformers import AutoModel

        super().__init__()
        self.enc = AutoModel.from_pretrained(minilm_dir(), local_files_only=True)
        self.head = torch.nn.Linear(EMBED_DIM, 1)

    def forward(self, enc):
        h = self.enc(**enc)[0]
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1)).squeeze(-1)


class Trainer:
    def __init__(self, args):
        from transformers import AutoTokenizer

        self.args = args
        self.tok = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
        self.t0 = time.perf_counter()

    def encode(self, pairs):
        return self.tok([q for q, _ in pairs], [a for _, a in pairs], padding=True, truncation="longest_first",
                        max_length=self.args.max_len, return_tensors="pt")

    def train(self, pairs, y):
        """A fine-tuned CrossEncoder; batches of similar length, each class half the weight."""
        a = self.args
        torch.manual_seed(0)
        net = CrossEncoder().train()
        y = np.asarray(y, float)
        w = harm.balance_classes(y, np.ones(len(y)))
        opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=0.01)
        steps = a.epochs * math.ceil(len(y) / a.batch)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * max(0.0, (steps - s) / steps))
        rng = np.random.default_rng(0)
        lens = np.array([len(ans) for _, ans in pairs])
        for epoch in range(a.epochs):
            perm = rng.permutation(len(y))
            chunks = [perm[i:i + a.batch * 20] for i in range(0, len(perm), a.batch * 20)]
            batches = [c[np.argsort(lens[c])][j:j + a.batch] for c in chunks for j in range(0, len(c), a.batch)]
            rng.shuffle(batches)
            total = 0.0
            for b in batches:
                logits = net(self.encode([pairs[i] for i in b]))
                loss = (torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, torch.tensor(y[b], dtype=torch.float32), reduction="none")
                    * torch.tensor(w[b], dtype=torch.float32)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach())
            print(f"  epoch {epoch} loss {total / len(batches):.4f} {time.perf_counter() - self.t0:.0f}s", flush=True)
        return net.eval()

    @torch.inference_mode()
    def predict(self, net, pairs):
        out = np.zeros(len(pairs))
        order = np.argsort([len(ans) for _, ans in pairs])
        for i in range(0, len(order), 64):
            b = order[i:i + 64]
            out[b] = torch.sigmoid(net(self.encode([pairs[j] for j in b]))).numpy()
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("folds", help="comma-separated folds to judge (0-4)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=192, help="tokens of request + answer")
    ap.add_argument("--rows", type=int, default=0, help="packaged training rows added (0: none)")
    ap.add_argument("--lr", type=float, default=4e-5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kinds = [read_answers(d) for d in default_readings()]
    read = [r for h, _ in kinds for r in h if r.answer.strip()]
    benign = [r for _, b in kinds for r in b if r.answer.strip()]
    benign = [benign[i] for i in harm._distinct(benign)]
    learned = harm._distinct(read)
    fold = harm.read_folds(read)
    rows = [r for r in training_rows() if r.split == "train"] if args.rows else []
    random.Random(0).shuffle(rows)
    rows = rows[:args.rows]
    y_read = np.array([float(r.harmful) for r in read])
    trainer = Trainer(args)
    p = np.full(len(read), np.nan)
    for k in [int(f) for f in args.folds.split(",")]:
        rest = learned[fold[learned] != k]
        pairs = [(r.request, r.answer) for r in rows + benign] + [(read[i].request, read[i].answer) for i in rest]
        y = [float(r.harmful) for r in rows] + [0.0] * len(benign) + list(y_read[rest])
        print(f"fold {k}: {len(pairs)} training pairs ({int(sum(y))} harmful)", flush=True)
        net = trainer.train(pairs, y)
        m = np.where(fold == k)[0]
        p[m] = trainer.predict(net, [(read[i].request, read[i].answer) for i in m])
        judged = np.array([i for i in learned if fold[i] == k])
        line = {"fold": k, "args": vars(args), "distinct_read": int(len(learned)),
                "at_0.5": harm.binary_metrics(y_read[judged].astype(bool), p[judged], 0.5),
                "seconds": round(time.perf_counter() - trainer.t0)}
        print(json.dumps(line), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(line) + "\n")
        np.save(args.out + ".p.npy", p)
    judged = np.array([i for i in learned if not np.isnan(p[i])])
    line = {"fold": "all judged", "args": vars(args), "distinct_read": int(len(learned)),
            "at_0.5": harm.binary_metrics(y_read[judged].astype(bool), p[judged], 0.5)}
    print(json.dumps(line), flush=True)
    with open(args.out, "a") as fh:
        fh.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
