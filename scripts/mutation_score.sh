#!/usr/bin/env bash
# Mutation score of the numerical core (issue 18), reproducible:
#
#   pip install mutmut==3.8.1            # into the project's venv (mutmut 3: names, config and CLI differ from 2)
#   scripts/mutation_score.sh GROUP              # run the group's unchecked mutants, print its score and survivors
#   scripts/mutation_score.sh GROUP NAME...      # re-test the named mutants (after new tests); NAME may be a glob
#
# GROUP (each scores named functions only; the lists and the reasons for what is left out are in the case below):
#   cka        repsim/measures/gram.py, the estimators of repsim/measures/cka_engine.py    tests/test_cka.py tests/test_gram_tier.py
#   measures   the kernels of repsim/measures/beyond_cka.py               tests/test_similarity.py
#   attention  statistics of repsim/attention/statistics.py, the Swin reducer path   tests/test_attention_stats.py + one family test
#   probes     objective, gradient and ridge solver of probes/solvers.py    tests/test_probes_linear.py
# Every group's tests also include tests/test_mutation_kills.py.
#
# mutmut 3 copies the sources into ./mutants and reads [tool.mutmut] from pyproject.toml. This script runs it in a
# copy of repsim/ hooks/ probes/ tests/ and pyproject.toml under $MUTATION_DIR/GROUP (default
# ${TMPDIR:-/tmp}/repsim-mutation) with the table appended to the copy, so the checkout's pytest configuration is
# never touched, concurrent edits in the checkout do not leak into a run, and each group has its own test
# selection. A re-run re-copies the sources; mutmut keeps the results of functions whose source did not change.
# Delete the group's directory for a run from scratch. Lines that raise (error-message text, checked by the tests'
# pytest.raises(match=...)) are not mutated.
#
# CPU: `nice -n 19`, one mutmut child, one BLAS/OpenMP thread. Prints killed / survived / timeout / not checked,
# the score (killed + timeout) / checked, and the survivors (`mutmut show NAME` in the group's directory: a diff).
set -euo pipefail

group="${1:?usage: scripts/mutation_score.sh cka|measures|attention|probes [MUTANT_GLOB ...]}"
shift
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${MUTATION_DIR:-${TMPDIR:-/tmp}/repsim-mutation}/$group"

case "$group" in
  cka)
    files='"repsim/measures/gram.py", "repsim/measures/cka_engine.py"'
    tests='"tests/test_cka.py", "tests/test_gram_tier.py"'
    # cka_engine.py also holds store reading, alignment, the minibatch/Dask/Gram-tier drivers (which feed
    # MinibatchCKA), results and plotting: only the estimators are scored
    globs=(
      'repsim.measures.gram.*'
      'repsim.measures.cka_engine.x_gram_linear__*' 'repsim.measures.cka_engine.x_gram_rbf__*' 'repsim.measures.cka_engine.x_u_centre_np__*'
      'repsim.measures.cka_engine.x_centre_gram__*' 'repsim.measures.cka_engine.x_cka_from_grams__*' 'repsim.measures.cka_engine.x__cosine__*'
      'repsim.measures.cka_engine.x_feature_space_linear_cka__*' 'repsim.measures.cka_engine.x_cka__*'
      'repsim.measures.cka_engine.xǁMinibatchCKAǁ*' 'repsim.measures.cka_engine.x_batch_plan__*'
      'repsim.measures.cka_engine.x_contiguous_plan__*' 'repsim.measures.cka_engine.x_minibatch_cka__*'
      'repsim.measures.cka_engine.x__exact_feature_form__*' 'repsim.measures.cka_engine.x__exact_matrix__*'
    ) ;;
  measures)
    files='"repsim/measures/beyond_cka.py"'
    tests='"tests/test_similarity.py"'
    # the kernels of every measure: Procrustes ν, the CCA sides / reduction / correlations, PWCCA weights, RDMs and
    # their correlation, k-NN neighbourhoods and scores, the p-value's "at least as extreme". Not scored (time box):
    # input checks, the registry, the public wrappers and result dicts (similarity_details, permutation_null,
    # bootstrap_interval), the fast permutation / resampling paths (_rsa_permuter, _rsa_resampler,
    # _pwcca_permuter) and pwcca_reference; and never reachable by mutmut: the factories _procrustes_impl /
    # _permuter, _cca_impl / _permuter, _knn_impl / _permuter / _resampler, _cka_impl / _permuter, whose
    # closures _registry() builds at import, before mutmut's per-call switch can select a mutant
    globs=(
      'repsim.measures.beyond_cka.x__centre__*' 'repsim.measures.beyond_cka.x__shape_factor__*'
      'repsim.measures.beyond_cka.x__nu__*' 'repsim.measures.beyond_cka.x__side__*'
      'repsim.measures.beyond_cka.x__n_keep__*' 'repsim.measures.beyond_cka.x__cap__*'
      'repsim.measures.beyond_cka.x__n_distinct_rows__*' 'repsim.measures.beyond_cka.x__collapse__*'
      'repsim.measures.beyond_cka.x__cca_sides__*' 'repsim.measures.beyond_cka.x__rhos__*'
      'repsim.measures.beyond_cka.x__clip_rho__*' 'repsim.measures.beyond_cka.x__pwcca_from__*'
      'repsim.measures.beyond_cka.x__rdm__*' 'repsim.measures.beyond_cka.x__pearson__*'
      'repsim.measures.beyond_cka.x__rsa_compare__*' 'repsim.measures.beyond_cka.x__triangle__*'
      'repsim.measures.beyond_cka.x__cosine__*' 'repsim.measures.beyond_cka.x__neighbours__*'
      'repsim.measures.beyond_cka.x__overlap__*' 'repsim.measures.beyond_cka.x__knn_score__*'
      'repsim.measures.beyond_cka.x__extreme__*'
    ) ;;
  attention)
    files='"hooks/capture/attention_reduce.py", "repsim/attention/statistics.py"'
    tests='"tests/test_attention_stats.py", "tests/test_vit_families.py::test_family_capture_is_exact_and_stats_equal_recomputation"'
    # scored: attention distance, prefix mass, entropy, the per-head and class-attention statistics, rollout, and
    # the online reducer's windowed (Swin) path. Not scored (time box): head kinds (aligned maps, offsets,
    # head_features, classify_heads), cross-attention grids, AttentionReducer.__call__, store-level drivers
    globs=(
      'hooks.capture.attention_reduce.xǁAttentionReducerǁ_windowed*'
      'repsim.attention.statistics.x__renormalised_patch_block__*' 'repsim.attention.statistics.x__distance_from_block__*'
      'repsim.attention.statistics.x__pixel_distances__*' 'repsim.attention.statistics.x_grid_positions__*'
      'repsim.attention.statistics.x_attention_distance__*' 'repsim.attention.statistics.x_prefix_mass__*'
      'repsim.attention.statistics.x_attention_entropy__*' 'repsim.attention.statistics.x_head_statistics__*'
      'repsim.attention.statistics.x_class_attention_statistics__*' 'repsim.attention.statistics.x_attention_rollout__*'
      'repsim.attention.statistics.x_rollout_map__*'
    ) ;;
  probes)
    files='"probes/solvers.py"'
    tests='"tests/test_probes_linear.py"'
    # scored: the softmax objective and its gradient, the preconditioner, the bias curvature bound, the ridge
    # statistics and eigen-solver, the near-constant feature rule, accuracy and the strength pick. Not scored
    # (time box): fit_logreg's L-BFGS driver (solve, stopping checks, warm-start memory, path, refit),
    # ridge_classify's orchestration, standardisation, class encoding, prediction, the store driver, result class
    # and plotting
    globs=(
      'probes.solvers.x_accuracy_scores__*' 'probes.solvers.x__pick__*' 'probes.solvers.x__standardising_scale__*'
      'probes.solvers.xǁ_SoftmaxProblemǁloss_grad*'
      'probes.solvers.xǁ_SoftmaxProblemǁpreconditioner*' 'probes.solvers.xǁ_SoftmaxProblemǁbias_curvature*'
      'probes.solvers.xǁ_RidgeStatsǁ*' 'probes.solvers.xǁ_RidgeEigǁ*'
    ) ;;
  *) echo "error: unknown group '$group' (cka, measures, attention, probes)" >&2; exit 2 ;;
esac

mkdir -p "$work"
(cd "$work" && rm -rf repsim hooks probes tests)
# tar keeps modification times: mutmut re-generates mutants only for files whose source is newer than its copy
tar -C "$repo" --exclude __pycache__ --exclude '*.zarr' -cf - repsim hooks probes tests | tar -C "$work" -xf -
{ cat "$repo/pyproject.toml"; cat <<EOF

[tool.mutmut]
source_paths = ["repsim", "hooks", "probes"]
only_mutate = [$files]
pytest_add_cli_args_test_selection = [$tests, "tests/test_mutation_kills.py"]
pytest_add_cli_args = ["-p", "no:cacheprovider"]
# error-message text is checked by the tests' pytest.raises(match=...), not part of the numerics scored here
do_not_mutate_patterns = ['^\\s*raise \\w+\\(']
EOF
} > "$work/pyproject.toml.new"
# rewrite only when it changed: a changed test selection makes mutmut re-collect its coverage statistics
cmp -s "$work/pyproject.toml.new" "$work/pyproject.toml" 2>/dev/null || mv "$work/pyproject.toml.new" "$work/pyproject.toml"
rm -f "$work/pyproject.toml.new"

cd "$work"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
summary() {  # summary MODE GLOB...: MODE=pending prints the group's unchecked mutants, MODE=report the counts
  python3 - "$@" <<'PY'
import collections, fnmatch, json, pathlib, sys
from mutmut.stats import status_by_exit_code
mode, globs = sys.argv[1], sys.argv[2:]
status = {}
for meta in pathlib.Path("mutants").rglob("*.py.meta"):
    for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
        if any(fnmatch.fnmatch(name, g) for g in globs):
            status[name] = status_by_exit_code[code]
if mode == "pending":  # unchecked mutants, and the globs of functions whose mutants are not generated yet
    print("\n".join(sorted(n for n, s in status.items() if s == "not checked")
                    + [g for g in globs if not any(fnmatch.fnmatch(n, g) for n in status)]))
    sys.exit()
counts = collections.Counter(status.values())
checked = sum(counts.values()) - counts["not checked"]
caught = counts["killed"] + counts["timeout"] + counts["segfault"]
print(f"mutants {len(status)}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
if checked:
    print(f"score (killed + timeout + segfault) / checked = {caught}/{checked} = {caught / checked:.1%}")
for n, s in sorted(status.items()):
    if s not in ("killed", "timeout", "segfault"):
        print(f"  {s:11s} {n}")
PY
}
if [ "$#" -gt 0 ]; then
  names=("$@")                                     # re-test the named mutants, checked or not
else
  names=("${globs[@]}")                            # a fresh directory: every mutant of the group
  if [ -d mutants ]; then mapfile -t names < <(summary pending "${globs[@]}"); fi
fi
if [ "${#names[@]}" -gt 0 ]; then
  start=$(date +%s)
  nice -n 19 mutmut run --max-children 1 "${names[@]}" > run.log 2>&1 || { tail -30 run.log; exit 1; }
  echo "group $group: mutmut run of ${#names[@]} names took $(( $(date +%s) - start )) s (log: $work/run.log)"
fi
summary report "${globs[@]}"
