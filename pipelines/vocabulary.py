"""The MLflow vocabulary: every tag key, metric key, alias and name pattern that pipelines/, tune/,
serving/ and benchmarks/ write or read, named once. Plain constants and three small functions;
no Ray, no MLflow, so anything may import it (fldd/ does not: it never knows about MLflow).

The step budget T is written in these places (values are strings in MLflow):

=========================  ==================================  =====================================
name                       where / value                       written by
=========================  ==================================  =====================================
NUM_STEPS_TAG              run tag `num_steps_T`               pipelines.train (from process.num_steps)
VERSION_BUDGET_TAG         version tag `fldd.num_steps_T`      pipelines.registry (from the model's config)
DEFAULT_BUDGET_TAG         model tag `fldd.default_budget`     pipelines.registry (first T promoted)
champion_alias(T)          alias `champion-t<T>`               pipelines.registry; budget_of_alias reads it
RUN_NAME, TRIAL_RUN_NAME   `...-T<T>-...` in run names         pipelines.train, tune.sweep
=========================  ==================================  =====================================

Run tags (training runs; a sweep trial is a training run with the sweep tags added):

- RUN_NAME_TAG: the run's name, its identity (a rerun of a name resumes it); also a version tag.
- PARAMETERIZATION_TAG, DATASET_TAG: the config's parameterization and data set name; also version
  tags (and DATASET_TAG is the identity tag `dataset` of registered models).
- METHOD_TAG, GIT_COMMIT_TAG, RAY_VERSION_TAG, TORCH_VERSION_TAG, WORKERS_TAG, DEVICE_TAG,
  STORAGE_TAG, RAY_GCS_TAG: how and where it ran (pipelines.train; the sweep's parent run has
  GIT_COMMIT_TAG, RAY_VERSION_TAG and STORAGE_TAG too).
- RESUMED_TAG, TRAIN_STEPS_TAG: set when a run is resumed (pipelines.tracking).
- ERROR_TAG: why it failed (pipelines.train; removed on resume and when a trial was stopped early).
- MODEL_ID_TAG, MODEL_URI_TAG: its logged sampler (pipelines.tracking, pipelines.train).
- COLLAPSED_TAG, SATURATED_TAG: "True"/"False", the final collapse check (pipelines.train); the
  registry refuses, and sweeps report, collapsed runs.
- EARLY_STOPPED_TAG: a trial the scheduler stopped (tune.sweep).
- PARENT_TAG: MLflow's own key nesting a trial under its sweep's run (tune.sweep).
- SWEEP_TAG, KIND_TAG (KIND_SWEEP | KIND_TRIAL), TRIAL_TAG, RAY_NODE_TAG: sweep trials (a trial's budget
  is its NUM_STEPS_TAG, as for any run);
  the parent run has SWEEP_TAG, KIND_TAG, BUDGETS_TAG, DIGEST_TAG and BEST_RUN_TAG per T (tune).

Registered-model tags (pipelines.registry): IDENTITY_TAGS (data set, vocabulary size, sequence
length; also on each version), DEFAULT_BUDGET_TAG, history_tag(alias) (the alias's holders, JSON).

Model-version tags (pipelines.registry): VERSION_BUDGET_TAG, PARAMETERIZATION_TAG, VERSION_METHOD_TAG,
IDENTITY_TAGS, VALID_NELBO_TAG, VALID_STDERR_TAG, VERSION_GIT_COMMIT_TAG, RUN_NAME_TAG, SOURCE_TAG
(SOURCE_SWEEP | SOURCE_RUN), SWEEP_TAG; the gate's record: DECISION_TAG ... MARGIN_RULE_TAG,
EVAL_SEED_TAG, EVAL_PASSES_TAG; ROLLED_BACK_AT_TAG. LoggedModel tag: MODEL_VERSIONS_TAG.

Metrics: VALID_NELBO_METRIC at each checkpoint (also Ray Train's and Tune's score; fldd.train's
evaluate spells it too), FINAL_PREFIX + each key of the final report (FINAL_VALID_NELBO_METRIC, ...),
EVAL_PREFIX + each key `fldd evaluate --run` logs, BEST_VALID_METRIC per T on a sweep's parent run.

Aliases: CHAMPION (the default budget's champion) and champion_alias(T) = `champion-t<T>`, with its
inverse budget_of_alias.
"""

from __future__ import annotations

EXPERIMENT = "fldd"  # the MLflow experiment every run goes to
MODEL_NAME = "model"  # the LoggedModel's name: runs:/<run_id>/model
REGISTERED_MODEL_NAME = "fldd-{dataset}"  # the default registered model of a data set
TAG_PREFIX = "fldd."

# --- run tags -------------------------------------------------------------------------------------
RUN_NAME_TAG = "fldd.run_name"
PARAMETERIZATION_TAG = "fldd.parameterization"
DATASET_TAG = "fldd.dataset"
NUM_STEPS_TAG = "num_steps_T"
METHOD_TAG = "method"
GIT_COMMIT_TAG = "git_commit"
RAY_VERSION_TAG = "ray_version"
TORCH_VERSION_TAG = "torch_version"
WORKERS_TAG = "workers"
DEVICE_TAG = "device"
STORAGE_TAG = "storage"
RAY_GCS_TAG = "ray_gcs_address"
RESUMED_TAG = "fldd.resumed"
TRAIN_STEPS_TAG = "fldd.train_steps"
ERROR_TAG = "fldd.error"
MODEL_ID_TAG = "fldd.model_id"  # the run's latest LoggedModel (m-...)
MODEL_URI_TAG = "model_uri"
COLLAPSED_TAG = "collapsed"
SATURATED_TAG = "saturated"
EARLY_STOPPED_TAG = "fldd.early_stopped"
PARENT_TAG = "mlflow.parentRunId"  # MLflow nests a child run under this parent in its UI

# --- sweep tags (trials and the sweep's parent run) ------------------------------------------------
SWEEP_TAG = "fldd.sweep"
KIND_TAG = "fldd.kind"
KIND_SWEEP, KIND_TRIAL = "sweep", "trial"  # values of KIND_TAG
TRIAL_TAG = "fldd.trial_id"
RAY_NODE_TAG = "ray_node_id"
BUDGETS_TAG = "budgets"
DIGEST_TAG = "fldd.sweep_digest"
BEST_RUN_TAG = "best_run_T{T}"  # .format(T=T)

# --- registered-model tags ---------------------------------------------------------------------------
IDENTITY_KEYS = ("dataset", "vocab_size", "seq_len")
IDENTITY_TAGS = {"dataset": DATASET_TAG, "vocab_size": "fldd.vocab_size", "seq_len": "fldd.seq_len"}
DEFAULT_BUDGET_TAG = "fldd.default_budget"
HISTORY_TAG_PREFIX = "fldd.history."
# a registered model NAME + ALIAS_LOCK_SUFFIX exists while a promotion or rollback moves NAME's aliases
ALIAS_LOCK_SUFFIX = ".fldd-alias-lock"
LOCK_OWNER_TAG = "fldd.lock_owner"

# --- model-version tags ------------------------------------------------------------------------------
VERSION_BUDGET_TAG = "fldd.num_steps_T"
VERSION_METHOD_TAG = "fldd.method"
VALID_NELBO_TAG = "fldd.valid_nelbo_bits"
VALID_STDERR_TAG = "fldd.valid_nelbo_stderr"
VERSION_GIT_COMMIT_TAG = "fldd.git_commit"
SOURCE_TAG = "fldd.source"
SOURCE_SWEEP, SOURCE_RUN = "sweep", "run"  # values of SOURCE_TAG
DECISION_TAG = "fldd.decision"
DECISION_REASON_TAG = "fldd.decision_reason"
DECIDED_AT_TAG = "fldd.decided_at"
TEST_NELBO_TAG = "fldd.test_nelbo_bits"
TEST_STDERR_TAG = "fldd.test_nelbo_stderr"
TEST_EXAMPLES_TAG = "fldd.test_examples"
TEST_SPLIT_TAG = "fldd.test_split_sha1"
HOLDER_VERSION_TAG = "fldd.holder_version"
HOLDER_TEST_NELBO_TAG = "fldd.holder_test_nelbo_bits"
PAIRED_DIFFERENCE_TAG = "fldd.paired_difference_bits"
PAIRED_STDERR_TAG = "fldd.paired_difference_stderr"
MARGIN_TAG = "fldd.margin_bits"
MARGIN_RULE_TAG = "fldd.margin_rule"
EVAL_SEED_TAG = "fldd.eval_seed"
EVAL_PASSES_TAG = "fldd.eval_passes"
ROLLED_BACK_AT_TAG = "fldd.rolled_back_at"
# sample scores of the candidate the gate records beside its NELBO (molecules: fldd.molecules), one
# tag each: fldd.test_validity, fldd.test_fcd, ...; reported, never what the gate decides on
TEST_SAMPLE_TAG_PREFIX = "fldd.test_"
MOLECULE_SCORES = ("validity", "uniqueness", "novelty", "copy_rate", "fcd", "fcd_molecules", "interior_padding")

MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # LoggedModel tag: [{"name", "version"}, ...]

# --- metrics -------------------------------------------------------------------------------------------
TRAIN_NELBO_METRIC = "nelbo"  # the training loop's every log_every steps (fldd.objective's key)
VALID_NELBO_METRIC = "valid_nelbo_bits"
VALID_STDERR_METRIC = "valid_nelbo_stderr"
COLLAPSED_METRIC = "collapsed"
SATURATED_METRIC = "saturated"
FINAL_PREFIX = "final_"  # the final report's metrics, logged at step train.steps
FINAL_VALID_NELBO_METRIC = FINAL_PREFIX + VALID_NELBO_METRIC
FINAL_VALID_STDERR_METRIC = FINAL_PREFIX + VALID_STDERR_METRIC
FINAL_TRAIN_SECONDS_METRIC = FINAL_PREFIX + "train_seconds"
FINAL_KL_METRIC = FINAL_PREFIX + "kl"  # exact KL on the 2-D toys (fldd.metrics)
EVAL_PREFIX = "eval_"  # `fldd evaluate --run`
BEST_VALID_METRIC = "best_valid_nelbo_bits_T{T}"  # sweep parent run; .format(T=T)

# --- aliases -------------------------------------------------------------------------------------------
CHAMPION = "champion"
CHAMPION_PREFIX = f"{CHAMPION}-t"

# --- run names ---------------------------------------------------------------------------------------
RUN_NAME = "{dataset}-{parameterization}-T{T}-seed{seed}-{digest}"  # a training run (pipelines.train)
TRIAL_RUN_NAME = "{sweep}-T{T}-{trial_id}"  # a sweep trial's Ray Train run and MLflow run
SWEEP_RUN_NAME = "sweep-{sweep}"  # a sweep's MLflow parent run


def champion_alias(budget: int) -> str:
    """`champion-t<T>`: the alias of the champion at step budget T."""
    return f"{CHAMPION_PREFIX}{int(budget)}"


def budget_of_alias(alias: str) -> int | None:
    """T of an alias `champion-t<T>` (T a positive integer written as champion_alias writes it),
    None for any other alias."""
    digits = alias[len(CHAMPION_PREFIX):] if alias.startswith(CHAMPION_PREFIX) else ""
    if not (digits.isascii() and digits.isdigit()) or digits.startswith("0"):
        return None
    return int(digits)


def history_tag(alias: str) -> str:
    """The registered-model tag holding an alias's holders, oldest first (a JSON list of versions)."""
    return HISTORY_TAG_PREFIX + alias
