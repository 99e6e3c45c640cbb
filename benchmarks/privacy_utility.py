"""Final AUC against epsilon: the default experiment without DP, with clipping alone, and with
the noise multipliers that spend epsilon about 1, 4 and 10 at delta = 1 / clients over the run.

Clipping alone runs twice: with the DP runs' clip norm and rows' denominator (what the noise
costs on top), and with its own, chosen on validation without noise (what clipping and the
fixed denominators cost by themselves).

Every run keeps the user table on the clients (`federated.local_tables [user]`: it never
leaves, needs no noise, and costs no AUC without DP) and samples clients by Poisson sampling
(accounted with PLD). The clip norm and the rows' denominator are the ones chosen on the
validation split (README); the noise multiplier for each epsilon comes from dp-accounting's
calibration. One run after another, one thread each.

Usage: python benchmarks/privacy_utility.py [--rows 200000] [--clients_per_round 20]
    [--rounds 1000] [--clip_norm 0.1] [--row_denominator 5] [--epsilons 1 4 10]
    [--clipping_only_norm 0.3] [--clipping_only_row_denominator 1]
Prints a row per run (validation and test AUC, epsilon, noise multiplier) and JSON last.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any

from figures import print_figures

from fltoolkit.privacy.accountant import ClientSampling, default_delta, noise_multiplier_for
from fltoolkit.run.fit import fit

warnings.filterwarnings("ignore")
EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "taobao.yaml"


def _run(args: argparse.Namespace, out: Path, name: str, *privacy: str) -> dict[str, Any]:
    """One run of the experiment; its final validation and test AUC and epsilon."""
    result = fit(EXPERIMENT, "--run_dir", str(out / name), "--data.num_rows", str(args.rows),
                 "--federated.rounds", str(args.rounds),
                 "--federated.clients_per_round", str(args.clients_per_round),
                 "--federated.eval_interval", str(max(1, args.rounds // 5)),
                 "--federated.local_tables", "[user]",
                 "--federated.selector.class_path", "fltoolkit.selection.PoissonSelector",
                 *privacy)
    summary = result.summary
    dp = summary["server_learns"].get("differential_privacy") or {}
    row = {"validation_auc": round(summary["validation"]["auc"], 4),
           "test_auc": round(summary["auc"], 4), "epsilon": dp.get("epsilon"),
           "noise_multiplier": dp.get("noise_multiplier"), "clients": summary["num_clients"],
           "wall_s": round(summary["wall_time_s"], 1)}
    print(name, row, flush=True)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--clients_per_round", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--clip_norm", type=float, default=0.1)
    parser.add_argument("--row_denominator", type=float, default=5.0)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 10.0])
    parser.add_argument("--clipping_only_norm", type=float, default=0.3)
    parser.add_argument("--clipping_only_row_denominator", type=float, default=1.0)
    args = parser.parse_args(argv)
    clipping = ["--privacy.clip_norm", str(args.clip_norm),
                "--privacy.row_denominator", str(args.row_denominator)]
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        runs["no_dp"] = _run(args, out, "no_dp")
        clients = runs["no_dp"]["clients"]
        runs["clipping_only"] = _run(args, out, "clipping_only", "--privacy.noise_multiplier",
                                     "0", *clipping)
        runs["clipping_only_own_settings"] = _run(
            args, out, "clipping_only_own_settings", "--privacy.noise_multiplier", "0",
            "--privacy.clip_norm", str(args.clipping_only_norm),
            "--privacy.row_denominator", str(args.clipping_only_row_denominator))
        sampling = ClientSampling("poisson", population=clients,
                                  sample_size=args.clients_per_round)
        for epsilon in args.epsilons:
            noise = noise_multiplier_for(epsilon, args.rounds, sampling, default_delta(clients))
            runs[f"epsilon_{epsilon:g}"] = _run(args, out, f"epsilon_{epsilon:g}",
                                                "--privacy.noise_multiplier", f"{noise:.4f}",
                                                *clipping)
    figures = {"runs": runs, "rows": args.rows, "clients": clients,
               "clients_per_round": args.clients_per_round, "rounds": args.rounds,
               "clip_norm": args.clip_norm, "row_denominator": args.row_denominator,
               "clipping_only_norm": args.clipping_only_norm,
               "clipping_only_row_denominator": args.clipping_only_row_denominator}
    print_figures("privacy_utility", figures,
                  f"python benchmarks/privacy_utility.py --rows {args.rows} --clients_per_round "
                  f"{args.clients_per_round} --rounds {args.rounds} --clip_norm {args.clip_norm}"
                  f" --row_denominator {args.row_denominator}")
    return figures


if __name__ == "__main__":
    main()
