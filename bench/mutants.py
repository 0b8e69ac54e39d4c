"""Break the privacy mechanism on purpose, in a copy of the repository, and show the tests kill each break.

Each mutant is a source edit of the kind a privacy bug would be: in the mechanism (noise divided by the
realised batch size, noise per physical chunk, ...) and outside it (the search's accounting, sweep
planning, resume, what reaches release/, selection, the audit, mixing). For each, a temporary copy of the repository (tracked and
untracked, not ignored, files; the worktree itself is never touched) gets the edit, and the privacy
test files run there (``PYTHONPATH`` at the copy, ``-m "not slow"``), the mutant's most relevant file
first, stopping at the first failure (``--all``: every failing test, slower). A mutant is *killed*
when a test fails; the table names it.
Mutants run ``--jobs`` at a time, each job in its own copy.

    .venv/bin/python bench/mutants.py                 # every mutant, a few minutes
    .venv/bin/python bench/mutants.py --only realised_batch
    .venv/bin/python bench/mutants.py --baseline      # first check the unmutated copy passes

Exit status 1 when a mutant survives, does not apply (its source moved), or the baseline fails.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRIVACY_TESTS = (
    "tests/test_mechanism.py", "tests/test_grads.py", "tests/test_mix.py", "tests/test_trainer.py", "tests/test_privacy.py",
    "tests/test_guards.py", "tests/test_sweep.py", "tests/test_search.py", "tests/test_report.py", "tests/test_sweep_audit.py",
    "tests/test_audit.py", "tests/test_compute_budget.py", "tests/test_release.py",
)


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    path: str
    edits: tuple[tuple[str, str], ...]  # (exact source, replacement), each found exactly once
    first: str  # the test file to run first

    def apply(self, root: Path) -> None:
        file = root / self.path
        text = file.read_text()
        for old, new in self.edits:
            if text.count(old) != 1:
                raise LookupError(f"mutant {self.name}: {old!r} occurs {text.count(old)} times in {self.path}")
            text = text.replace(old, new)
        file.write_text(text)


MUTANTS = (
    Mutant("realised_batch", "noisy sum divided by the realised batch size |B|, not q·N", "dpmix_ray/trainer.py",
           (("expected_batch_size=plan.sample_rate * n,", "expected_batch_size=max(1, len(idx)),"),), "tests/test_mechanism.py"),
    Mutant("noise_per_chunk", "noise added to each physical chunk's clipped sum", "dpmix_ray/mechanism.py",
           (("part = clipped_sum(source, self._clip_norm)", "part = add_noise(clipped_sum(source, self._clip_norm), self._std, self._generator)"),
            ("noisy = add_noise(summed, self._std, self._generator)", "noisy = summed")),
           "tests/test_mechanism.py"),
    Mutant("sigma_not_sigma_C", "noise std σ instead of σ·C", "dpmix_ray/mechanism.py",
           (("clip_norm, noise_multiplier * clip_norm, expected_batch_size", "clip_norm, noise_multiplier, expected_batch_size"),),
           "tests/test_mechanism.py"),
    Mutant("noise_halved", "noise std σ·C/2", "dpmix_ray/mechanism.py",
           (("clip_norm, noise_multiplier * clip_norm, expected_batch_size", "clip_norm, noise_multiplier * clip_norm / 2, expected_batch_size"),),
           "tests/test_mechanism.py"),
    Mutant("no_clipping", "clip factors all 1", "dpmix_ray/mechanism.py",
           (("return (clip_norm / (norms * (1 + CLIP_MARGIN_ULPS * f.eps) + f.tiny)).clamp(max=1.0)", "return torch.ones_like(norms)"),),
           "tests/test_grads.py"),
    Mutant("absolute_clip_margin", "the old clip factor C/(‖g‖ + 1e-6)", "dpmix_ray/mechanism.py",
           (("return (clip_norm / (norms * (1 + CLIP_MARGIN_ULPS * f.eps) + f.tiny)).clamp(max=1.0)", "return (clip_norm / (norms + 1e-6)).clamp(max=1.0)"),),
           "tests/test_mechanism.py"),
    Mutant("mix_with_itself", "self-mixup of an augmentation with itself (j = i)", "dpmix_ray/mix.py",
           (("j = (i + 1 + _below(u[..., 1], max(k - 1, 1))) % k", "j = i"),), "tests/test_mix.py"),
    Mutant("draws_by_batch_row", "augmentation and mixup draws keyed by batch row, not by the example's key", "dpmix_ray/trainer.py",
           (("draws = draw(labels, train_set.key[idx],", "draws = draw(labels, torch.arange(len(idx), device=device),"),),
           "tests/test_trainer.py"),
    Mutant("fixed_size_batches", "fixed-size shuffled batches instead of Poisson sampling", "dpmix_ray/mechanism.py",
           (("return torch.nonzero(u < sample_rate, as_tuple=False).flatten()",
             "return torch.randperm(n, generator=generator, device=generator.device)[: round(n * sample_rate)]"),),
           "tests/test_mechanism.py"),
    Mutant("public_seed_by_default", "mechanism randomness derived from the public seed in default runs", "dpmix_ray/trainer.py",
           (("rand = M.Randomness.secret_on(device) if private_run(cfg) else M.Randomness.from_seed(cfg.seed, device)",
             "rand = M.Randomness.from_seed(cfg.seed, device)"),), "tests/test_mechanism.py"),
    Mutant("secret_state_saved", "checkpoints hold the secret generators' states", "dpmix_ray/mechanism.py",
           (('return None if self.secret else {"sampler"', 'return {"sampler"'),
            ("if self.secret != (state is None):", "if False:")), "tests/test_mechanism.py"),
    Mutant("empty_batches_skipped", "steps whose Poisson batch is empty release nothing", "dpmix_ray/trainer.py",
           (("        idx = batch_indices(step)\n", "        idx = batch_indices(step)\n        if len(idx) == 0:\n            continue\n"),),
           "tests/test_mechanism.py"),
    Mutant("host_copy_per_chunk", "each chunk's images copied from the host dataset", "dpmix_ray/trainer.py",
           (("assemble(train_set.images(sel),", "assemble(splits.train.x[sel.cpu()].to(device),"),), "tests/test_trainer.py"),
    # ------------------------------------------------------------------ outside the mechanism (issue 16 §7)
    # accounting (dpmix_ray/privacy.py)
    Mutant("rs_steps_halved", "repeat-and-select accounts each trial as half its DP-SGD steps (the search ε understated)",
           "dpmix_ray/privacy.py",
           (("dp_event.GaussianDpEvent(noise_multiplier)), steps\n", "dp_event.GaussianDpEvent(noise_multiplier)), steps // 2\n"),),
           "tests/test_guards.py"),
    Mutant("rs_delta_loosened", "the search ε read off the RDP curve at 10·δ, not the sweep's δ", "dpmix_ray/privacy.py",
           (("mean_trials, shape)], delta)", "mean_trials, shape)], 10 * delta)"),), "tests/test_guards.py"),
    Mutant("rs_shape_ignored", "repeat-and-select always accounted as a Poisson trial count, whatever shape is drawn",
           "dpmix_ray/privacy.py",
           (("return dp_event.RepeatAndSelectDpEvent(run, mean_trials, shape)", "return dp_event.RepeatAndSelectDpEvent(run, mean_trials, math.inf)"),), "tests/test_guards.py"),
    Mutant("calibration_overspends", "calibrate_noise returns 0.97·σ and no longer re-checks ε(σ) <= target", "dpmix_ray/privacy.py",
           (("    if not spent(sigma) <= epsilon:\n        raise BudgetError(f\"calibrated",
             "    sigma *= 0.97\n    if False:\n        raise BudgetError(f\"calibrated"),),
           "tests/test_privacy.py"),
    Mutant("tuning_sigma_overspends", "the random search's σ calibrated (and nudged) to 1.2·ε", "dpmix_ray/privacy.py",
           (("            epsilon,\n            delta,\n", "            1.2 * epsilon,\n            delta,\n"),
            (") > epsilon:\n        sigma *= 1.001", ") > 1.2 * epsilon:\n        sigma *= 1.001")),
           "tests/test_privacy.py"),
    Mutant("check_plan_trusts_claim", "check_plan takes the plan's own ε claim instead of recomputing it from (σ, q, T, δ)",
           "dpmix_ray/privacy.py",
           (("            spent = epsilon_spent(noise_multiplier=plan.noise_multiplier,",
             "            spent = plan.epsilon_spent or epsilon_spent(noise_multiplier=plan.noise_multiplier,"),),
           "tests/test_privacy.py"),
    # sweep planning (dpmix_ray/sweep/plan.py, budget.py)
    Mutant("count_drawn_geometric", "the Poisson trial count drawn geometric with the same mean (not the accounted law)",
           "dpmix_ray/sweep/plan.py",
           (("return int(rng.poisson(mean))", "return int(rng.geometric(1.0 / mean))"),), "tests/test_guards.py"),
    Mutant("nb_count_wrong_parameter", "the truncated negative binomial drawn with 1−γ for γ", "dpmix_ray/sweep/plan.py",
           (("rng.negative_binomial(shape, gamma)", "rng.negative_binomial(shape, 1.0 - gamma)"),), "tests/test_guards.py"),
    Mutant("tpe_under_rs", "repeat_and_select accepts the adaptive TPE sampler", "dpmix_ray/sweep/plan.py",
           (('if cfg.search.sampler != "random":', 'if cfg.search.sampler not in ("random", "tpe"):'),), "tests/test_sweep.py"),
    Mutant("warm_start_under_rs", "warm starts on by default under repeat_and_select", "dpmix_ray/sweep/plan.py",
           (('cfg.search.warm_start is not None else cfg.tuning_privacy == "per_trial"', 'cfg.search.warm_start is not None else True'),),
           "tests/test_guards.py"),
    Mutant("transfer_under_rs", "transfer across ε on by default under repeat_and_select", "dpmix_ray/sweep/plan.py",
           (('cfg.search.transfer is not None else cfg.tuning_privacy == "per_trial"', 'cfg.search.transfer is not None else True'),),
           "tests/test_guards.py"),
    Mutant("one_seed_for_all_trials", "every trial of a phase gets the same public seed", "dpmix_ray/sweep/plan.py",
           (("return cfg.base.seed + index + (", "return cfg.base.seed + ("),), "tests/test_release.py"),
    Mutant("trial_sigma_not_tuning", "a repeat_and_select trial planned as one run at the full ε, not the group's tuning σ",
           "dpmix_ray/sweep/budget.py",
           (("return group_plan if group_plan is not None else _one_run(train_cfg, n)", "return _one_run(train_cfg, n)"),),
           "tests/test_sweep.py"),
    # resume (dpmix_ray/trainer.py)
    Mutant("secret_resume_restarts", "a resume without mechanism state (secret randomness) restarts at step 0: more steps than planned",
           "dpmix_ray/trainer.py",
           (('start_step, train_seconds = resume_state["step"], resume_state["seconds"]',
             'start_step, train_seconds = resume_state["step"] if resume_state["mechanism"] is not None else 0, resume_state["seconds"]'),),
           "tests/test_guards.py"),
    Mutant("resume_skips_a_step", "checkpoints record one step more than was run: a resume skips a step", "dpmix_ray/trainer.py",
           (('"step": step + 1, "seconds"', '"step": step + 2, "seconds"'),), "tests/test_guards.py"),
    # release filtering (dpmix_ray/report.py, sweep/claims.py, sweep/selection.py)
    Mutant("trial_counts_released", "the drawn trial count joins each released row", "dpmix_ray/report.py",
           (('"recipe_file", "best_at_epsilon",\n)', '"recipe_file", "best_at_epsilon", "trials_planned",\n)'),), "tests/test_report.py"),
    Mutant("reruns_released_under_rs", "the fresh-seed re-runs released under repeat_and_select too", "dpmix_ray/report.py",
           (('    return cfg.tuning_privacy == "per_trial"\n', "    return True\n"),), "tests/test_report.py"),
    Mutant("audit_results_released", "each group's audit result (ε_lb) joins its released row", "dpmix_ray/report.py",
           (("public = [released(cfg, r) for _, r in pairs]\n    files[",
             'public = [released(cfg, r) | {"audit": S.read_audits(out).get(r["group"])} for _, r in pairs]\n    files['),),
           "tests/test_sweep_audit.py"),
    Mutant("nonprivate_row_private", "the non-private reference's row claims to be private", "dpmix_ray/sweep/claims.py",
           (("return group.epsilon is not None and not reproducible(cfg)", "return not reproducible(cfg)"),), "tests/test_report.py"),
    Mutant("proxy_trial_released", "a selected proxy trial (outside the guarantee) is released itself", "dpmix_ray/sweep/selection.py",
           (('if chosen is None or not chosen.get("proxy"):', "if True:"),), "tests/test_report.py"),
    Mutant("best_method_by_test", "the best method per ε is marked by test accuracy, not released validation accuracy",
           "dpmix_ray/report.py", (('scored = [r for r in rows if r["epsilon"] == eps and r["val_accuracy"] is not None]',
                                     'scored = [r for r in rows if r["epsilon"] == eps and r["test_accuracy"] is not None]'),
                                    ('max(scored, key=lambda r: r["val_accuracy"])', 'max(scored, key=lambda r: r["test_accuracy"])')),
           "tests/test_report.py"),
    # planning under a compute budget (dpmix_ray/sweep/search.py)
    Mutant("budget_never_cuts", "search.budget: a planned search trial is handed out even when it would overrun the budget",
           "dpmix_ray/sweep/search.py", (("if self._issued[key] < self._counts[key] and self._would_overrun(key):",
                                           "if self._issued[key] < self._counts[key] and False:"),), "tests/test_compute_budget.py"),
    Mutant("budget_trusts_the_probe", "search.budget: estimates are never corrected by what trials took", "dpmix_ray/sweep/search.py",
           (("return took / said if took > 0 and said > 0 else 1.0", "return 1.0"),), "tests/test_compute_budget.py"),
    # selection (dpmix_ray/sweep/selection.py)
    Mutant("select_on_test", "the search trial with the best test accuracy is selected, not the best validation score",
           "dpmix_ray/sweep/selection.py",
           (('key=lambda r: (r["score"], -int(r["index"]))', 'key=lambda r: (r.get("test_accuracy") or 0.0, -int(r["index"]))'),),
           "tests/test_sweep.py"),
    # the audit (dpmix_ray/audit.py)
    Mutant("audit_guesses_with_truth", "the audit guesses from the canaries' true membership, not the model's scores",
           "dpmix_ray/audit.py",
           (("correct = count_correct(guess(scores[scored], top=top", "correct = count_correct(guess(included[scored].astype(float), top=top"),),
           "tests/test_guards.py"),
    Mutant("audit_public_membership", "black-box canary membership drawn from the public label seed, not 128 secret bits",
           "dpmix_ray/audit.py",
           (("    included = np.random.default_rng(secrets.randbits(128))", "    included = np.random.default_rng(label_seed)"),),
           "tests/test_audit.py"),
    Mutant("whitebox_public_membership", "white-box canary slots' membership drawn from the public seed", "dpmix_ray/audit.py",
           (("self.included = np.random.default_rng(secrets.randbits(128))", "self.included = np.random.default_rng(seed)"),),
           "tests/test_audit.py"),
    Mutant("audit_wrong_tail", "the p-value takes the lower binomial tail P[W <= v]", "dpmix_ray/audit.py",
           (("beta = float(pmf[correct:].sum())", "beta = float(pmf[: correct + 1].sum())"),), "tests/test_audit.py"),
    Mutant("audit_no_delta_term", "the p-value drops the 2mδ·α term", "dpmix_ray/audit.py",
           (("return min(1.0, beta + 2 * canaries * delta * alpha)", "return min(1.0, beta)"),), "tests/test_audit.py"),
    # mixing (dpmix_ray/mix.py)
    Mutant("mix_with_other_example", "a self-mixup's second image is the neighbouring example's augmentation", "dpmix_ray/mix.py",
           (("(1 - lam) * augs[bi, d.pair[..., 1]]", "(1 - lam) * augs.roll(1, 0)[bi, d.pair[..., 1]]"),), "tests/test_guards.py"),
    Mutant("diff_label_not_mixed", "a diffusion-mixup keeps the example's one-hot label", "dpmix_ray/mix.py",
           (("targets.append(lam[..., None] * onehot[:, None, :] + (1 - lam[..., None]) * syn_y)",
             "targets.append(onehot[:, None, :].expand(b, n, num_classes))"),), "tests/test_mix.py"),
)


def copy_repo(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the repository (no virtualenv, no caches)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_tests(root: Path, first: str | None, every: bool = False) -> tuple[int, list[str], float]:
    """(pytest's exit code, failing test ids, seconds) for the privacy test files, ``first`` first;
    up to the first failure unless ``every``."""
    files = ([first] if first else []) + [f for f in PRIVACY_TESTS if f != first]
    env = os.environ | {"PYTHONPATH": str(root), "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", *([] if every else ["-x"]), "-p", "no:cacheprovider", "-W", "ignore", *files]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out.stdout, flags=re.M)
    return out.returncode, [f.split("::", 1)[-1] for f in failed], time.perf_counter() - start


def try_mutant(m: Mutant, copy: Path, every: bool) -> tuple[bool, str]:
    """Apply ``m`` to ``copy``, run the tests, restore the file: (killed, one table row)."""
    original = (copy / m.path).read_text()
    try:
        m.apply(copy)
    except LookupError as e:
        return False, f"{m.name:24} {'NOT APPLIED':9}       {e}"
    try:
        code, failed, secs = run_tests(copy, m.first, every)
    finally:
        (copy / m.path).write_text(original)
    killed = code == 1 and bool(failed)  # 1: a test failed (not a usage or collection error)
    shown = ", ".join(failed) if failed else f"pytest exit {code}"
    return killed, f"{m.name:24} {'killed' if killed else 'SURVIVED':9} {secs:4.0f}  {shown}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=[m.name for m in MUTANTS], help="run this mutant (repeatable)")
    ap.add_argument("--baseline", action="store_true", help="first run the tests on the unmutated copy (they must pass)")
    ap.add_argument("--jobs", type=int, default=2, help="mutants tested at once, each in its own copy")
    ap.add_argument("--all", action="store_true", help="run every test file to the end and list every failing test")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = ap.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name:24} {m.path:24} {m.what}")
        return 0
    start, bad = time.perf_counter(), 0
    with tempfile.TemporaryDirectory(prefix="dpmix-mutants-") as tmp:
        copies: queue.Queue[Path] = queue.Queue()
        for j in range(max(1, min(args.jobs, len(mutants)))):
            copy_repo(Path(tmp) / f"repo{j}")
            copies.put(Path(tmp) / f"repo{j}")
        if args.baseline:
            code, failed, secs = run_tests(copies.queue[0], None)
            print(f"baseline (unmutated copy): {'pass' if code == 0 else 'FAIL ' + ', '.join(failed)} ({secs:.0f} s)", flush=True)
            bad += code != 0
        print(f"{'mutant':24} {'result':9} {'s':>4}  {'failing tests' if args.all else 'first failing test'}", flush=True)

        def job(m: Mutant) -> bool:
            copy = copies.get()
            try:
                killed, row = try_mutant(m, copy, args.all)
            finally:
                copies.put(copy)
            print(row, flush=True)
            return killed

        with ThreadPoolExecutor(max_workers=copies.qsize()) as pool:
            bad += sum(not killed for killed in pool.map(job, mutants))
    print(f"{len(mutants) - bad} of {len(mutants)} mutants killed in {time.perf_counter() - start:.0f} s", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
