#!/usr/bin/env bash
# Once per Prefect server, from any clone with PREFECT_API_URL set (docs/team.md, step 3): the two work pools,
# the automation that marks stage runs of dead workers Crashed, and the deployments of prefect.yaml.
# Safe to rerun (after a `git pull` that changed flows/ or prefect.yaml, rerun it to redeploy).
#   CRASH_AFTER_S (default 90): seconds without a stage run's heartbeat before it counts as lost.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PREFECT_API_URL:-}" ]; then
  echo "flows/setup.sh: error: PREFECT_API_URL is not set: export the team's Prefect server first (docs/team.md, step 2)" >&2
  exit 1
fi
prefect work-pool create cpu --type process --overwrite
prefect work-pool create gpu --type process --overwrite
automations=$(mktemp --suffix=.yaml)
trap 'rm -f "$automations"' EXIT
sed "s/within: 90/within: ${CRASH_AFTER_S:-90}/; s/for 90 s/for ${CRASH_AFTER_S:-90} s/" flows/automations.yaml > "$automations"
python - <<'PY'  # a rerun replaces the automation instead of adding a second one
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    for automation in client.read_automations_by_name("fewstep: crash stage runs of dead workers"):
        client.delete_automation(automation.id)
PY
prefect automation create --from-file "$automations"
prefect --no-prompt deploy --all
