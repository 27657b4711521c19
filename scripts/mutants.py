"""The project's mutation check: do the fast tests notice one-line bugs in the library?

Each mutant below changes one line (or one expression) of the library, the kind of slip a
refactor makes: routing a sample to the other modality's norms, cutting the consistency
term off the graph, filing a count under the other modality, exporting the other
modality's norms, a metric or statistic off by a factor. The check copies the tracked
files of the repository to a scratch folder, applies the mutants one at a time there
(never here), and runs the fast tests (``pytest -m "not integration" -x``) against each,
with the scratch copy first on ``PYTHONPATH``. A mutant that the tests do not fail
*survives*, and a survivor fails the check.

    make mutants                                   # all mutants, about 10-15 min on 2 cores
    .venv/bin/python scripts/mutants.py --only tap-detached export-other-modality
    .venv/bin/python scripts/mutants.py --list

An original snippet must occur exactly once in its file: when the code it names changes,
the check stops and says which mutant to update, rather than testing nothing.
Not part of CI (it runs the fast tests ~40 times); the last result is in
documentation/testing.md.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_TESTS = ["-m", "not integration", "-x", "-q", "-p", "no:cacheprovider", "--no-header", "-W", "ignore"]
#: the fast tests that take longest run last, so that a mutant another test kills is not waited on
SLOWEST_LAST = ("tests/test_compile.py",)


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    original: str
    mutated: str
    what: str


M = Mutant
MUTANTS = (
    # ---- the modality-specific norms' routing
    M("norm-affine-gathered-reversed", "nnunetv2_csa/modality_norm.py",
      "weight = torch.stack([norm.weight for norm in self.norms]).index_select(0, index)",
      "weight = torch.stack([norm.weight for norm in self.norms]).index_select(0, index.flip(0))",
      "per-sample path: samples get another sample's affine weight"),
    M("norm-int-modality-index-0", "nnunetv2_csa/modality_norm.py",
      "sample_modality=torch.tensor([modality], device=device)",
      "sample_modality=torch.tensor([0], device=device)",
      "per-sample path: a whole batch of one modality (inference) is normalised as modality 0"),
    M("norm-sub-batches-swapped", "nnunetv2_csa/modality_norm.py",
      "return torch.cat([self._apply_norm(k, c) for k, c in zip(routing.present, chunks)])",
      "return torch.cat([self._apply_norm(k, c) for k, c in zip(reversed(routing.present), chunks)])",
      "sub-batch path: each modality's sub-batch meets the other modality's norms"),
    M("norm-unsorted-batch-not-restored", "nnunetv2_csa/modality_norm.py",
      "return out.index_select(0, routing.unsort_order)",
      "return out",
      "an unsorted batch comes back in modality order instead of its own"),
    M("norm-routing-stays-on-the-cpu", "nnunetv2_csa/modality_norm.py",
      "            self._routing = self._routing.moved(fn)\n",
      "",
      "the routing index stays behind when nnU-Net's predictor moves the network (CUDA refuses the gather)"),
    M("term-read-back-inside-the-step", "nnunetv2_csa/training/consistency.py",
      "self.last_consistency = term.detach()",
      "self.last_consistency = term.detach().cpu()",
      "the training step waits for the device to read the term before backward() is queued"),
    M("region-based-dataset-accepted", "nnunetv2_csa/training/nnUNetTrainerCSA.py",
      "        if self.label_manager.has_regions:",
      "        if False:",
      "a region-based dataset trains with class masks that misread its regions"),
    M("norm-single-modality-batch-to-0", "nnunetv2_csa/modality_norm.py",
      "sample_modality=sample_modality, single=present[0],",
      "sample_modality=sample_modality, single=0,",
      "a batch of one modality is normalised by modality 0's norms"),
    M("norm-order-assumed-sorted", "nnunetv2_csa/modality_norm.py",
      "is_sorted = bool((on_host[1:] >= on_host[:-1]).all())",
      "is_sorted = True",
      "an interleaved batch is split as if ordered by modality"),
    M("norm-int-modality-ignored", "nnunetv2_csa/modality_norm.py",
      "return self._apply_norm(routing.single, x)",
      "return self._apply_norm(0, x)",
      "inference always uses modality 0's norms"),
    M("fold-picks-first-modality", "nnunetv2_csa/modality_norm.py",
      "            return module.norms[modality]\n",
      "            return module.norms[0]\n",
      "folding keeps modality 0's norms whatever was asked"),
    # ---- the unpaired sampler
    M("sampler-extra-slot-not-rotated", "nnunetv2_csa/sampler.py",
      "counts[(batch_number + extra) % n_modalities] += 1",
      "counts[extra % n_modalities] += 1",
      "an odd batch always gives the extra sample to modality 0"),
    M("sampler-draws-one-modality", "nnunetv2_csa/sampler.py",
      "keys.extend(np.random.choice(cases, count, replace=True))",
      "keys.extend(np.random.choice(self.cases_of_modality[0], count, replace=True))",
      "every sample of the batch is drawn from modality 0's cases"),
    M("sampler-oversampling-over-whole-batch", "nnunetv2_csa/sampler.py",
      "return self._forced[sample_idx]",
      "return not sample_idx < round(self.batch_size * (1 - self.oversample_foreground_percent))",
      "foreground oversampling only in the last modality's block (nnU-Net's whole-batch rule)"),
    M("sampler-oversampling-rounded-otherwise", "nnunetv2_csa/sampler.py",
      "forced_total = batch_size - round(batch_size * (1 - oversample_foreground_percent))",
      "forced_total = round(batch_size * oversample_foreground_percent)",
      "the number of forced samples no longer nnU-Net's (another rounding)"),
    M("sampler-modality-vector-reversed", "nnunetv2_csa/sampler.py",
      "batch[\"modality\"] = torch.as_tensor([self.modality_tags.index_of_case(k) for k in batch[\"keys\"]],",
      "batch[\"modality\"] = torch.as_tensor([self.modality_tags.index_of_case(k) for k in batch[\"keys\"][::-1]],",
      "the batch's modality vector does not match its samples"),
    # ---- the losses
    M("csa-literal-reading-by-default", "nnunetv2_csa/losses/affinity.py",
      "per_class = difference.pow(2).mean(dim=(-2, -1))",
      "per_class = difference.mean(dim=(-2, -1)).pow(2)",
      "Eq. 4' computed as the printed Eq. 4"),
    M("csa-classes-of-one-modality-compared", "nnunetv2_csa/losses/affinity.py",
      "shared = (num_samples[first] > 0) & (num_samples[second] > 0)  # (Q, K)",
      "shared = (num_samples[first] > 0) | (num_samples[second] > 0)  # (Q, K)",
      "a class absent from one modality still enters the average"),
    M("csa-sum-instead-of-mean-over-samples", "nnunetv2_csa/losses/affinity.py",
      "weights = weights / num_samples.clamp_min(1)[..., None]",
      "weights = weights",
      "A^{c,j} summed over a modality's samples instead of averaged"),
    M("csa-cosine-not-normalised-by-k", "nnunetv2_csa/losses/affinity.py",
      "cosine = inner / (norm_l[..., :, None] * norm_k[..., None, :])",
      "cosine = inner / norm_l[..., :, None]",
      "Eq. 3 divides by one channel's norm only"),
    M("masks-inverted", "nnunetv2_csa/losses/masks_and_pairs.py",
      "return (labels.flatten(1)[:, None, :] == class_ids[None, :, None]).float()",
      "return (labels.flatten(1)[:, None, :] != class_ids[None, :, None]).float()",
      "each class mask covers everything but the class"),
    M("masks-resized-by-other-rule", "nnunetv2_csa/losses/masks_and_pairs.py",
      "mode=\"nearest-exact\")[:, 0]",
      "mode=\"nearest\")[:, 0]",
      "labels resized unlike nnU-Net's deep-supervision targets"),
    M("average-ignores-validity", "nnunetv2_csa/losses/masks_and_pairs.py",
      "per_pair = (values * valid).sum(-1) / valid.sum(-1).clamp_min(1)",
      "per_pair = values.sum(-1) / valid.sum(-1).clamp_min(1)",
      "classes absent from a pair still add their value"),
    M("ummkd-without-temperature", "nnunetv2_csa/losses/ummkd.py",
      "log_q = F.log_softmax(mean_logits / self.temperature, dim=-1)",
      "log_q = F.log_softmax(mean_logits, dim=-1)",
      "UMMKD's softmax ignores the temperature"),
    M("ummkd-one-sided-kl", "nnunetv2_csa/losses/ummkd.py",
      "symmetric_kl = 0.5 * ((log_p1.exp() - log_p2.exp()) * (log_p1 - log_p2)).sum(-1)",
      "symmetric_kl = (log_p1.exp() * (log_p1 - log_p2)).sum(-1)",
      "KL(p1||p2) instead of the symmetric KL"),
    # ---- the consistency term in the trainer, λ and its schedule
    M("csa-term-on-detached-features", "nnunetv2_csa/training/consistency.py",
      "return self.term(features_l, features_k, target, modality)",
      "return self.term(features_l.detach(), features_k.detach(), target, modality)",
      "the CSA term no longer reaches the network (the outside check's first survivor)"),
    M("ummkd-term-on-detached-logits", "nnunetv2_csa/training/consistency.py",
      "return self.term(output, target, modality)",
      "return self.term(output.detach(), target, modality)",
      "the UMMKD term no longer reaches the network"),
    M("term-detached-in-the-sum", "nnunetv2_csa/training/consistency.py",
      "return loss + self.weight * term",
      "return loss + self.weight * term.detach()",
      "the consistency term is added as a constant"),
    M("lambda-not-divided-by-n", "nnunetv2_csa/training/consistency.py",
      "return paper_lambda / n_modalities",
      "return paper_lambda",
      "the paper's λ applied to nnU-Net's mean loss (N times the paper's weight)"),
    M("msbn-computes-the-term", "nnunetv2_csa/training/consistency.py",
      "if not self.active or self.weight == 0:",
      "if not self.active:",
      "λ = 0 (MSBN) still computes the term every step"),
    M("rampup-one-epoch-ahead", "nnunetv2_csa/training/consistency.py",
      "return 1.0 if ramp_epochs <= 0 else min(1.0, epoch / ramp_epochs)",
      "return 1.0 if ramp_epochs <= 0 else min(1.0, (epoch + 1) / ramp_epochs)",
      "the λ ramp-up starts above 0"),
    M("batch-modality-not-the-samples", "nnunetv2_csa/training/nnUNetTrainerCSA.py",
      "self._route(batch[\"modality\"])",
      "self._route(batch[\"modality\"].flip(0))",
      "the training step routes the batch by a modality vector of other samples"),
    # ---- the feature taps
    M("tap-detached", "nnunetv2_csa/feature_taps.py",
      "self._features[name] = output",
      "self._features[name] = output.detach()",
      "the tapped feature maps are cut off from the graph"),
    M("tap-not-copied", "nnunetv2_csa/feature_taps.py",
      "self._features[name] = output.clone()",
      "self._features[name] = output",
      "ResEnc: the tap holds conv2's output after the residual sum changed it in place"),
    M("tap-kept-in-final-validation", "nnunetv2_csa/training/nnUNetTrainerCSA.py",
      "with self.feature_tap.paused() if self.feature_tap is not None else nullcontext():",
      "with nullcontext():",
      "the final validation keeps every patch's tapped features (a compiled graph per case)"),
    M("tap-same-layer-twice", "nnunetv2_csa/feature_taps.py",
      "return blocks[0], blocks[1]",
      "return blocks[0], blocks[0]",
      "the affinity compares a layer with itself"),
    M("tap-deeper-stage", "nnunetv2_csa/feature_taps.py",
      "stage = len(stages) // 2",
      "stage = len(stages) // 2 + 1",
      "the default layers are not the middle encoder stage"),
    M("inference-routing-by-deep-supervision", "nnunetv2_csa/training/nnUNetTrainerCSA.py",
      "if not _TRAINER_BUILDS_ITS_NETWORK.get():",
      "if not enable_deep_supervision:",
      "the predictor's network is told apart from the trainer's by deep supervision, not by who builds it"),
    # ---- the validation's attribution to modalities
    M("validation-counts-under-other-modality", "nnunetv2_csa/training/per_modality_validation.py",
      "per_mod[m] = out[key]",
      "per_mod[n_modalities - 1 - m] = out[key]",
      "pseudo Dice counts filed under the other modality (the outside check's second survivor)"),
    M("validation-sub-batch-routed-to-0", "nnunetv2_csa/training/per_modality_validation.py",
      "            self._route(m)\n",
      "            self._route(0)\n",
      "every validation sub-batch meets modality 0's norms"),
    M("final-validation-case-routed-to-0", "nnunetv2_csa/training/per_modality_validation.py",
      "self.trainer._route(self.trainer.modality_tags.index_of_case(case))",
      "self.trainer._route(0)",
      "every final-validation case meets modality 0's norms"),
    # ---- the export
    M("export-other-modality", "nnunetv2_csa/tools/export.py",
      "plain = fold_modality(network, modalities.index(modality))",
      "plain = fold_modality(network, len(modalities) - 1 - modalities.index(modality))",
      "the export folds the other modality's norms (the outside check's third survivor)"),
    M("nonfinite-replay-not-routed", "nnunetv2_csa/tools/nonfinite.py",
      "        set_modality(replica, modality)\n",
      "        set_modality(replica, 0)\n",
      "the GPU check's replay of a non-finite step gives every sample modality 0's norms"),
    # ---- the metrics
    M("dice-without-factor-2", "nnunetv2_csa/tools/evaluation.py",
      "return dict(dice=2.0 * intersection / (n_pred + n_ref), hd=float(pooled.max()),",
      "return dict(dice=intersection / (n_pred + n_ref), hd=float(pooled.max()),",
      "Dice without its factor 2"),
    M("hd95-smaller-direction", "nnunetv2_csa/tools/evaluation.py",
      "hd95_value = max(np.percentile(pred_to_ref, HD_PERCENTILE), np.percentile(ref_to_pred, HD_PERCENTILE))",
      "hd95_value = min(np.percentile(pred_to_ref, HD_PERCENTILE), np.percentile(ref_to_pred, HD_PERCENTILE))",
      "HD95 takes the smaller directed percentile"),
    M("both-empty-scores-0", "nnunetv2_csa/tools/evaluation.py",
      "return dict(dice=1.0, hd=0.0, hd95=0.0, assd=0.0, n_ref_voxels=0, n_pred_voxels=0, flag=\"both_empty\")",
      "return dict(dice=0.0, hd=0.0, hd95=0.0, assd=0.0, n_ref_voxels=0, n_pred_voxels=0, flag=\"both_empty\")",
      "a class absent from prediction and reference scores Dice 0"),
    # ---- the statistics
    M("holm-as-bonferroni", "nnunetv2_csa/tools/statistics.py",
      "scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])",
      "scaled = np.minimum(1.0, m * p[order])",
      "Holm's step-down replaced by Bonferroni"),
    M("holm-not-monotone", "nnunetv2_csa/tools/statistics.py",
      "adjusted[order] = np.maximum.accumulate(scaled)",
      "adjusted[order] = scaled",
      "Holm's adjusted p-values not made monotone"),
    M("wilcoxon-unpaired-order", "nnunetv2_csa/tools/evaluation.py",
      "result = stats.wilcoxon(paired[\"a\"].to_numpy(), paired[\"b\"].to_numpy())",
      "result = stats.wilcoxon(paired[\"a\"].to_numpy(), paired[\"b\"].to_numpy()[::-1])",
      "the Wilcoxon test pairs method A's patients with other patients of B"),
    # ---- the modality-order check
    M("order-check-ignores-order", "nnunetv2_csa/modality_order.py",
      "if stored != expected:",
      "if sorted(stored) != sorted(expected):",
      "weights of another modality order load silently when the names are the same"),
)

#: mutants that no test can fail because they do not change behaviour, with the reason (none so far)
EQUIVALENT: dict[str, str] = {}


def _tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPOSITORY,
                            check=True, capture_output=True).stdout.decode().split("\0")
    return [f for f in listed if f and os.path.isfile(os.path.join(REPOSITORY, f))]


def _copy_repository(destination: str) -> None:
    for relative in _tracked_files():
        target = os.path.join(destination, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(REPOSITORY, relative), target)


def check_mutant_applies(mutant: Mutant, source: str) -> None:
    count = source.count(mutant.original)
    if count != 1:
        raise SystemExit(f"mutant {mutant.name}: its original text occurs {count} times in {mutant.path} (must be "
                         f"once); update the mutant in scripts/mutants.py to the code as it is now")


def _run_fast_tests(copy: str, timeout: int) -> tuple[bool, str, float]:
    """(passed, the first failure's line, seconds)."""
    # no empty entry: it would put the current folder on sys.path (the tests check that nothing from it runs)
    python_path = os.pathsep.join(p for p in [copy, *os.environ.get("PYTHONPATH", "").split(os.pathsep)] if p)
    env = {**os.environ, "PYTHONPATH": python_path, "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        files = sorted(os.path.relpath(path, copy) for path in glob.glob(os.path.join(copy, "tests", "test_*.py")))
        files = [f for f in files if f not in SLOWEST_LAST] + [f for f in SLOWEST_LAST if f in files]
        result = subprocess.run([sys.executable, "-m", "pytest", *FAST_TESTS, *files], cwd=copy, env=env,
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    lines = result.stdout.strip().splitlines()
    failed = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    first = failed[0] if failed else (lines[-1] if lines else "")
    return result.returncode == 0, first, seconds


def _imports_the_copy(copy: str) -> bool:
    env = {**os.environ, "PYTHONPATH": copy}
    probe = "import nnunetv2_csa, os; print(os.path.realpath(nnunetv2_csa.__file__))"
    found = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=env, capture_output=True, text=True,
                           check=True).stdout.strip()
    return found.startswith(os.path.realpath(copy))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--json", metavar="FILE", help="also write the result to FILE")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per test run (default 600)")
    args = parser.parse_args(argv)
    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        raise SystemExit("two mutants share a name")
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:42s} {m.path}: {m.what}")
        return 0
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        raise SystemExit(f"unknown mutants {unknown}; --list shows them")
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    for mutant in chosen:  # every mutant must apply before anything runs
        with open(os.path.join(REPOSITORY, mutant.path)) as f:
            check_mutant_applies(mutant, f.read())

    results = []
    with tempfile.TemporaryDirectory(prefix="nnunetv2_csa_mutants_") as copy:
        _copy_repository(copy)
        if not _imports_the_copy(copy):
            raise SystemExit("the scratch copy is not the nnunetv2_csa that Python imports; the check would test "
                             "the unmutated package")
        passed, failure, seconds = _run_fast_tests(copy, args.timeout)
        print(f"{'unmutated':42s} {'passes' if passed else 'FAILS'} ({seconds:.0f} s)", flush=True)
        if not passed:
            raise SystemExit(f"the fast tests fail without any mutant ({failure}): fix them first")
        for mutant in chosen:
            path = os.path.join(copy, mutant.path)
            with open(path) as f:
                original = f.read()
            with open(path, "w") as f:
                f.write(original.replace(mutant.original, mutant.mutated))
            try:
                passed, failure, seconds = _run_fast_tests(copy, args.timeout)
            finally:
                with open(path, "w") as f:
                    f.write(original)
            status = "equivalent" if passed and mutant.name in EQUIVALENT else "SURVIVED" if passed else "killed"
            results.append({"mutant": mutant.name, "path": mutant.path, "what": mutant.what, "status": status,
                            "first_failure": "" if passed else failure, "seconds": round(seconds, 1)})
            print(f"{mutant.name:42s} {status:9s} ({seconds:.0f} s) {'' if passed else failure}", flush=True)

    survivors = [r["mutant"] for r in results if r["status"] == "SURVIVED"]
    killed = sum(r["status"] == "killed" for r in results)
    print(f"\n{killed} of {len(results)} mutants killed"
          + (f"; {len(results) - killed - len(survivors)} equivalent" if len(results) - killed - len(survivors) else "")
          + (f"; SURVIVED: {', '.join(survivors)}" if survivors else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"killed": killed, "mutants": len(results), "survivors": survivors, "results": results}, f,
                      indent=1)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
