"""``python -m sim.commands.feature_net``: train the project's feature network, or report its FID/KID table.

The network and its training live in :mod:`sim.core.feature_net`; the reference table in
:func:`sim.core.fidelity.reference_table` (the model card's numbers).
"""
from __future__ import annotations

import argparse

import torch

from sim.core.feature_net import (
    DEFAULT_DIR,
    TRAIN_SEED,
    load_feature_net,
    train_feature_net,
)
from sim.core.fidelity import reference_table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sim.commands.feature_net", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_DIR), help="output folder (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=TRAIN_SEED)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--report", action="store_true",
                    help="train nothing: print FID / KID (project features) of the weights in --out against "
                         "real and altered circles (the model card's reference table)")
    ap.add_argument("--n", type=int, default=64, help="--report: images per set (default 64)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report:
        for name, (fid, kid) in reference_table(args.n, net=load_feature_net(args.out)).items():
            print(f"{name:28s} FID(project) {fid:8.1f}   KID(project) {kid:8.3f}")
        return
    train_feature_net(args.out, steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr)


if __name__ == "__main__":
    main()
