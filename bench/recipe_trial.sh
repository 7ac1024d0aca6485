#!/usr/bin/env bash
# docs/orchestration.md "Two machines: a recipe", tried on one machine: the head in a team clone, two worker nodes
# in clones of their own (separate scratch folders), the team remotes as local folders. Only the data import (a
# sample) and the size overrides of the last command are added, so that it trains in minutes.
# Usage: bash bench/recipe_trial.sh  (from a clone with ../shared beside it; it makes recipe-* folders beside the
# clone and in /var/tmp, starts the team services and Ray, and leaves them running: `braintumor services down` in
# ../recipe-head and `ray stop` end them). Its console: docs/results/console/two-machine-recipe.txt.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
W=$(dirname "$REPO")
rm -rf $W/recipe-team.git $W/recipe-dvc $W/recipe-head $W/recipe-w1 $W/recipe-w2 /var/tmp/braintumor-w1 /var/tmp/braintumor-w2
git clone -q --bare "$REPO" $W/recipe-team.git
git clone -q $W/recipe-team.git $W/recipe-head

SYSTEM_PATH=$PATH  # before the head's venv is activated: a worker machine has only its own
worker() {  # the worker block, verbatim but for the variables a second machine would hold; a clean environment
  local dir=$1 scratch=$2
  env -u VIRTUAL_ENV -u MLFLOW_TRACKING_URI -u MLFLOW_TRACKING_USERNAME -u MLFLOW_TRACKING_PASSWORD -u PREFECT_API_URL \
      -u PREFECT_API_AUTH_STRING -u RAY_AUTH_MODE -u RAY_AUTH_TOKEN -u MLFLOW_AUTH_ADMIN_PASSWORD \
      -u MLFLOW_FLASK_SERVER_SECRET_KEY -u PREFECT_SERVER_API_AUTH_STRING PATH="$SYSTEM_PATH" W=$W TRAINER_PASSWORD="$TRAINER_PASSWORD" HEAD_TOKEN="$HEAD_TOKEN" \
      DIR="$dir" SCRATCH="$scratch" bash -euo pipefail -c '
    export HEAD=127.0.0.1 GIT_REMOTE=$W/recipe-team.git
    cd $W && git clone -q "$GIT_REMOTE" "$DIR" && cd "$DIR"
    python3 -m pip install -q uv && python3 -m uv sync -q --frozen --compile-bytecode --extra ray
    export MLFLOW_TRACKING_URI="http://$HEAD:5000" MLFLOW_TRACKING_USERNAME=trainer MLFLOW_TRACKING_PASSWORD="$TRAINER_PASSWORD"
    export BRAINTUMOR_NODE_SCRATCH=$SCRATCH
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$HEAD_TOKEN"
    .venv/bin/ray start --address="$HEAD:6379" --num-cpus=2 --resources="{\"trainer\": 1}"'
}

cd $W/recipe-head
python3 -m uv sync -q --frozen --compile-bytecode --extra dev --extra ray && . .venv/bin/activate
# services.md: the secrets `services up` needs
export MLFLOW_AUTH_ADMIN_PASSWORD="recipe-admin-$(openssl rand -hex 8)" MLFLOW_FLASK_SERVER_SECRET_KEY="$(openssl rand -hex 32)"
export PREFECT_SERVER_API_AUTH_STRING="team:$(openssl rand -hex 12)"
braintumor data import --source ../shared/datasets/brain-tumor-mri --sample 12
git add -A && git commit -qm "data: a sample of 12 per class" || true

# --- the head block, verbatim (HEAD and DVC_REMOTE: this machine's) ---
export HEAD=127.0.0.1 DVC_REMOTE=$W/recipe-dvc
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$(openssl rand -hex 32)"  # Ray's token auth: give every node this token
dvc remote add -d team "$DVC_REMOTE" && git commit -qm "DVC remote: team" .dvc/config  # where inputs and outputs travel
git push origin HEAD                                                # the nodes check this commit out
ray start --head --port=6379 --num-cpus=0                           # the head schedules; it trains nothing
eval "$(braintumor services up)"                                    # the team MLflow server (docs/services.md)
# ---

# The admin makes the trainer user and gives it EDIT on the experiment (services.md, Users).
export TRAINER_PASSWORD="trainer-$(openssl rand -hex 8)" HEAD_TOKEN="$RAY_AUTH_TOKEN"
python - <<'PY'
import os, mlflow
from mlflow.server import get_app_client
from components.config import load_params
from components import tracking
params = load_params("params.yaml")
tracking.configure(params.tracking)
experiment = mlflow.get_experiment_by_name(params.tracking.experiment)
auth = get_app_client("basic-auth", tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
auth.create_user("trainer", os.environ["TRAINER_PASSWORD"])
auth.grant_user_permission("trainer", "experiment", experiment.experiment_id, "EDIT")
print("trainer may edit experiment", experiment.experiment_id)
PY

worker recipe-w1 /var/tmp/braintumor-w1
worker recipe-w2 /var/tmp/braintumor-w2
ray status | head -20

# --- then, on the head (verbatim, plus the quick profile's size overrides) ---
QUICK=$(python -c "from components.config import load_params; print(' '.join('-S ' + o for o in load_params('params.yaml').quick.overrides))")
time braintumor -S flow.runner=ray -S "flow.ray_address=$HEAD:6379" -S "flow.ray_stage_resources={trainer: 1}" $QUICK flow train
echo "--- after"
dvc status
ls /var/tmp/braintumor-w1 /var/tmp/braintumor-w2
