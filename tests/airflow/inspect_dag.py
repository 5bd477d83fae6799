"""Run by the Airflow virtual environment: load a DAG folder in Airflow's DagBag and print its task graph as JSON.

`python inspect_dag.py DAG_FOLDER` prints {"import_errors": {...}, "dags": {dag_id: {task_id: {"upstream": [...],
"downstream": [...], "pool": ..., "command": ...}}}}; with `--test DAG_ID` it also creates the metadata database
(AIRFLOW_HOME's sqlite) and every pool the tasks name (one slot each, as for one GPU), runs `dag.test()` and adds
the final state of every task instance. `dag.test()` syncs the DAG bundles, so AIRFLOW__CORE__DAGS_FOLDER must be
the same folder.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--test", help="a dag_id to run with dag.test()")
    args = parser.parse_args(argv)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=args.folder)
    report = {
        "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
        "dags": {
            dag_id: {
                task.task_id: {
                    "upstream": sorted(task.upstream_task_ids),
                    "downstream": sorted(task.downstream_task_ids),
                    "pool": task.pool,
                    "command": task.bash_command,
                }
                for task in dag.tasks
            }
            for dag_id, dag in bag.dags.items()
        },
    }
    if args.test:
        from airflow.models.pool import Pool
        from airflow.utils.db import initdb

        initdb()
        dag = bag.dags[args.test]
        for pool in {task.pool for task in dag.tasks} - {Pool.DEFAULT_POOL_NAME}:
            Pool.create_or_update_pool(pool, slots=1, description="one GPU", include_deferred=False)
        run = dag.test()
        report["states"] = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
