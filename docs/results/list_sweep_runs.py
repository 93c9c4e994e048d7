"""List one sweep's MLflow runs with MlflowClient (nesting, swept values, validation and test UA).

    python docs/results/list_sweep_runs.py sqlite:///runs/default/mlflow.db serray-tune
"""
import sys
from mlflow import MlflowClient

client = MlflowClient(sys.argv[1])
exp = client.get_experiment_by_name(sys.argv[2])
runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)
print(f"experiment {exp.name}: {len(runs)} runs")
kids = {}
for r in runs:
    kids.setdefault(r.data.tags.get("mlflow.parentRunId"), []).append(r)

def line(r, depth):
    t, p, m = r.data.tags, r.data.params, r.data.metrics
    if t.get("stage") == "trial":
        desc = f"{t['experiment']} trial {t['trial_id']}: mask_ratio={p.get('adapter.mask_ratio')} num_clusters={p.get('adapter.num_clusters')} val_ua={m.get('val_ua', float('nan')):.4f}"
    elif t.get("stage") == "final":
        choice = ", ".join(f"fold {k.split('.')[0][4:]}: {v}" for k, v in sorted(p.items()) if k.endswith("trial_id"))
        desc = f"{r.info.run_name}: {choice}; test_ua={m['test_ua']:.4f} ± {m['test_ua_std']:.4f}"
    else:
        desc = f"{r.info.run_name}: {len(p)} params"
    print("  " * depth + f"- [{r.info.status}] {r.info.run_id[:8]} {desc}")
    for c in kids.get(r.info.run_id, []):
        line(c, depth + 1)

for r in kids.get(None, []):
    line(r, 0)
