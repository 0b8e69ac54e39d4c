"""``dpmix-ray``: train | plan | audit | synth | sweep | report | export | check-cluster.

Every user-facing failure (DPMixError) is printed as one line on stderr with exit code 2, before
anything is written. Heavy imports (torch models, Ray, diffusers) happen inside each command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpmix_ray.errors import ConfigError, DPMixError


def _print_json(obj: dict) -> None:
    print(json.dumps(obj, default=str, allow_nan=True), flush=True)


def cmd_train(args: argparse.Namespace) -> None:
    from dpmix_ray.config import load_train_config
    from dpmix_ray.trainer import train

    cfg = load_train_config(args.config, args.set)
    result = train(cfg, progress=not args.json)
    if not args.json:
        shown = {k: v for k, v in result.items() if k != "config"}
        width = max(len(k) for k in shown)
        for k, v in shown.items():
            print(f"  {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"  {k:<{width}}  {v}", file=sys.stderr)
    _print_json({k: v for k, v in result.items() if k != "config"} | {"config": result["config"]})


_PLAN_FLAGS = ("epsilon", "delta", "sample_rate", "steps", "epochs", "noise_multiplier")


def cmd_plan(args: argparse.Namespace) -> None:
    if any(getattr(args, f) is not None for f in _PLAN_FLAGS):
        if args.config is not None or args.set:
            raise ConfigError("give either CONFIG [--set …] or the --epsilon/--delta/--sample-rate flags, not both")
        return _plan_flags(args)
    from dpmix_ray.config import load_train_config
    from dpmix_ray.cost import data_shape, describe_run, estimate_run

    cfg = load_train_config(args.config, args.set)
    estimate = estimate_run(cfg, data_shape(cfg.data))
    if not args.json:
        print("\n".join(describe_run(estimate)), file=sys.stderr)
    _print_json(estimate)


def _plan_flags(args: argparse.Namespace) -> None:
    """The calibration alone: σ (or the step count) for (ε, δ, q), no data, no model."""
    from dpmix_ray.config import privacy_config
    from dpmix_ray.privacy import calibrate_noise, epsilon_spent, max_steps, steps_for_epochs

    lengths = [f for f in ("steps", "epochs", "noise_multiplier") if getattr(args, f) is not None]
    if args.epsilon is None or args.delta is None or args.sample_rate is None or len(lengths) != 1:
        raise ConfigError("--epsilon, --delta, --sample-rate and exactly one of --steps/--epochs/--noise-multiplier are required")
    if not 0 < args.sample_rate <= 1:
        raise ConfigError(f"--sample-rate: must be in (0, 1] (got {args.sample_rate})")
    if not args.epsilon > 0:
        raise ConfigError(f"--epsilon: must be > 0 (got {args.epsilon})")
    if not 0 < args.delta < 1:
        raise ConfigError(f"--delta: must be in (0, 1) (got {args.delta})")
    privacy_config({"accountant": args.accountant, "neighbouring": args.neighbouring}, "plan")  # the pair is checked in one place
    q, acct = args.sample_rate, dict(accountant=args.accountant, neighbouring=args.neighbouring)
    if args.noise_multiplier is not None:
        if not args.noise_multiplier > 0:
            raise ConfigError("--noise-multiplier: must be > 0")
        sigma = args.noise_multiplier
        steps = max_steps(epsilon=args.epsilon, delta=args.delta, sample_rate=q, noise_multiplier=sigma, **acct)
    else:
        steps = args.steps if args.steps is not None else steps_for_epochs(args.epochs, q)
        if steps < 1:
            raise ConfigError("--steps/--epochs: must give at least one step")
        sigma = calibrate_noise(epsilon=args.epsilon, delta=args.delta, sample_rate=q, steps=steps, **acct)
    spent = epsilon_spent(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=args.delta, **acct)
    out = {"noise_multiplier": sigma, "steps": steps, "epochs": steps * q, "sample_rate": q, "epsilon_target": args.epsilon,
           "epsilon_spent": spent, "delta": args.delta, **acct}
    if args.json:
        _print_json(out)
    else:
        print(f"σ = {sigma:.4f}, {steps} steps ({steps * q:.2f} epochs) at q = {q:.4g}: "
              f"ε_spent = {spent:.4f} ≤ {args.epsilon:g} (δ = {args.delta:g}, {args.accountant}, {args.neighbouring})")


def cmd_audit(args: argparse.Namespace) -> None:
    from dpmix_ray.audit import run_audit
    from dpmix_ray.config import AUDIT_CANARIES, load_train_config

    cfg = load_train_config(args.config, args.set)
    report = run_audit(cfg, canaries=args.canaries or AUDIT_CANARIES, guesses=args.guesses, progress=not args.json,
                       white_box=not args.black_box, estimator=args.estimator, directions=args.directions)
    if not report["private"]:
        report["verdict"] = f"NOT PRIVATE: {report['guarantee']}"
    if not args.json:
        claim = "no ε" if report["epsilon"] is None else f"ε = {report['epsilon']:.3f}, δ = {report['delta']:g}"
        tuned = "tuned on a held-out half" if report["guesses_tuned"] else "fixed in advance"
        print(f"  ε_lb = {report['epsilon_lower_bound']:.2f} at {report['confidence']:.0%} confidence, {report['setting']}, "
              f"estimator {report['estimator']} ({report['correct']}/{report['guesses']} guesses right, {tuned}; "
              f"{report['canaries_scored']} of {report['canaries']} canaries scored) for a run claiming {claim}", file=sys.stderr)
        if "verdict" in report:
            print(f"  {report['verdict']}", file=sys.stderr)
    _print_json(report)


def cmd_synth(args: argparse.Namespace) -> None:
    from dpmix_ray.config import load_data_config, load_synth_config
    from dpmix_ray.synth import generate_for

    cfg = load_synth_config(args.config, args.set)
    path = generate_for(cfg, load_data_config(args.config, args.set), progress=not args.json)
    _print_json({"synthetic_set": str(path)})


def cmd_sweep(args: argparse.Namespace) -> None:
    from dpmix_ray.config import load_sweep_config
    from dpmix_ray.sweep import run_sweep

    cfg = load_sweep_config(args.config, args.set)
    if args.dry_run:
        from dpmix_ray.cost import data_shape
        from dpmix_ray.sweep.estimate import describe_sweep, estimate_sweep

        estimate = estimate_sweep(cfg, data_shape(cfg.base.data))
        print("\n".join(describe_sweep(estimate)), file=sys.stderr)
        return _print_json(estimate)
    if args.storage:
        cfg = cfg.model_copy(update={"storage": args.storage})
    out = Path(args.out) if args.out else Path("results") / cfg.name
    print(run_sweep(cfg, out=out, resume=args.resume, address=args.address))


def cmd_report(args: argparse.Namespace) -> None:
    from dpmix_ray.report import build_report
    from dpmix_ray.storage import fetch_remote_sweep, is_uri
    from dpmix_ray.sweep import state

    if is_uri(args.dir):  # a sweep on shared storage (s3://…): fetched, rebuilt, release/ and the report uploaded back
        out, mirror = fetch_remote_sweep(args.dir)
        build_report(out)
        mirror.push()
    else:
        out = Path(args.dir)
        if not out.is_dir():
            raise ConfigError(f"{out}: no such sweep output directory")
        build_report(out)
    release = state.path(out, state.RELEASE)
    said = f"released: {release}" if release.is_dir() else f"nothing released yet ({state.RELEASE}/ is written once the sweep may publish it)"
    print(f"{said}  curator only: {state.path(out, state.CURATOR_REPORT)}")


def cmd_export(args: argparse.Namespace) -> None:
    from dpmix_ray.report import export_bundle

    files = export_bundle(Path(args.dir), args.method, args.epsilon, Path(args.to))
    print(f"exported {args.method} at ε={args.epsilon:g} to {args.to}: {', '.join(files)} (its guarantee is this recipe's alone)")


def cmd_check_cluster(args: argparse.Namespace) -> None:
    from dpmix_ray.cluster import check_cluster

    for line in check_cluster(Path(args.config)):
        print(line)


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="dpmix-ray", description="Privacy-budgeted DP-Mix recipe search.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    def with_set(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="dotted overrides, e.g. privacy.epsilon=2")

    t = sub.add_parser("train", help="train one config (the embedded default when CONFIG is omitted)")
    t.add_argument("config", nargs="?", default=None)
    with_set(t)
    t.add_argument("--json", action="store_true", help="no progress bar or summary; only the JSON result line")
    t.set_defaults(fn=cmd_train)

    pl = sub.add_parser("plan", help="a config's resolved recipe, work and estimated wall time (a short probe on random "
                        "inputs; writes nothing), or with --epsilon/--delta/--sample-rate σ (or the step count) alone")
    pl.add_argument("config", nargs="?", default=None, help="a train config (the embedded default when omitted)")
    with_set(pl)
    pl.add_argument("--epsilon", type=float)
    pl.add_argument("--delta", type=float)
    pl.add_argument("--sample-rate", type=float)
    g = pl.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int)
    g.add_argument("--epochs", type=float)
    g.add_argument("--noise-multiplier", type=float)
    pl.add_argument("--accountant", choices=["rdp", "prv", "pld"], default="rdp")
    pl.add_argument("--neighbouring", choices=["zero_out", "replace_one"], default="zero_out")
    pl.add_argument("--json", action="store_true", help="only the JSON line")
    pl.set_defaults(fn=cmd_plan)

    a = sub.add_parser("audit", help="one-run empirical privacy audit (a lower bound on ε) of a training config")
    a.add_argument("config", nargs="?", default=None)
    with_set(a)
    a.add_argument("--canaries", type=int, help="m canaries: white-box gradient slots added to N, or (--black-box) mislabelled "
                   "training images (default 1000)")
    a.add_argument("--guesses", type=int, help="r guesses, half 'in', half 'out', fixed before the run, every canary scored "
                   "(default: tuned on a held-out half of the canaries, the other half scored)")
    a.add_argument("--black-box", action="store_true", help="input canaries scored on the final model only (default: white-box)")
    a.add_argument("--estimator", choices=["max", "steinke", "fdp"], default="max",
                   help="max: Steinke et al. and the f-DP bound at 97.5%% each, the larger (default); or one named in advance")
    a.add_argument("--directions", choices=["dirac", "random"], default="dirac", help="white-box canary directions (default dirac)")
    a.add_argument("--json", action="store_true", help="no progress bar or summary; only the JSON result line")
    a.set_defaults(fn=cmd_audit)

    s = sub.add_parser("synth", help="generate (or reuse) a diffusion synthetic set with Ray Data")
    s.add_argument("config")
    with_set(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_synth)

    sw = sub.add_parser("sweep", help="Ray Tune + Optuna search per ε")
    sw.add_argument("config")
    with_set(sw)
    sw.add_argument("--resume", action="store_true")
    sw.add_argument("--dry-run", action="store_true", help="print every group's recipe and the estimated cost (a short probe on "
                    "random inputs), then stop: no Ray, nothing written")
    sw.add_argument("--address", default=None, help="auto | ray://host:port (default: a local Ray)")
    sw.add_argument("--out", default=None, help="output dir (default results/<sweep name>)")
    sw.add_argument("--storage", default=None, metavar="URI",
                    help="shared storage, e.g. s3://bucket/sweeps: Tune's trials and a mirror of the output dir go to "
                         "URI/<out dir name> (default: the config's storage, else $DPMIX_RAY_STORAGE_PATH, else local)")
    sw.set_defaults(fn=cmd_sweep)

    r = sub.add_parser("report", help="rebuild a sweep's release/ (table, plot, models) and curator/ report from its ledger (a dir or an s3://… sweep)")
    r.add_argument("dir")
    r.set_defaults(fn=cmd_report)

    e = sub.add_parser("export", help="one released (method, ε) as a bundle whose guarantee is that recipe's alone")
    e.add_argument("dir", metavar="OUT_DIR")
    e.add_argument("--method", required=True)
    e.add_argument("--epsilon", type=float, required=True)
    e.add_argument("--to", required=True, metavar="DIR")
    e.set_defaults(fn=cmd_export)

    c = sub.add_parser("check-cluster", help="validate a Ray cluster YAML offline")
    c.add_argument("config")
    c.set_defaults(fn=cmd_check_cluster)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except DPMixError as e:
        print(f"dpmix-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dpmix-ray {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
