"""Launch plans: scheduled retraining and retraining when the dataset changes.

Register them with the workflow (``pyflyte register workflows/ --project qloraflow --domain development``),
then activate a schedule (``flytectl update launchplan -p qloraflow -d development nightly_retrain --activate``).

- ``nightly_retrain`` runs ``finetune`` every night at 02:00 UTC on the config (and so the data location)
  fixed below.
- ``retrain_on_new_data`` runs every hour. Every task is cached on the *content* of its inputs (the first
  task hashes the data files), so on an unchanged dataset the whole DAG is a cache hit and no model version
  is registered; the first run after a new dataset version lands at the same location trains, evaluates and,
  if it beats the champion, promotes.
"""

import os

from flytekit import CronSchedule, LaunchPlan
from flytekit.types.file import FlyteFile

from workflows.finetune import finetune

# Where the scheduled config lives: a bucket path on a cluster, the demo config locally.
SCHEDULED_CONFIG = os.environ.get("QLORAFLOW_SCHEDULED_CONFIG", "configs/tiny.yaml")

nightly_retrain = LaunchPlan.get_or_create(
    workflow=finetune,
    name="nightly_retrain",
    fixed_inputs={"config": FlyteFile(SCHEDULED_CONFIG)},
    schedule=CronSchedule(schedule="0 2 * * *"),
)

retrain_on_new_data = LaunchPlan.get_or_create(
    workflow=finetune,
    name="retrain_on_new_data",
    fixed_inputs={"config": FlyteFile(SCHEDULED_CONFIG)},
    schedule=CronSchedule(schedule="0 * * * *"),
)
