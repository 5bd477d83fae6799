"""Ingest pipeline: raw prompts → prepared prompts + summary → calibration / holdout."""

from kedro.pipeline import Node, Pipeline

from budcache_pipeline.pipelines.ingest.nodes import clean_prompts, split_sets


def create_pipeline(**kwargs: object) -> Pipeline:
    return Pipeline(
        [
            Node(
                clean_prompts,
                inputs=["raw_prompts", "params:ingest"],
                outputs=["prepared_prompts", "ingest_summary@json"],
                name="clean_prompts",
            ),
            Node(
                split_sets,
                inputs="prepared_prompts",
                outputs=["calibration_prompts", "holdout_prompts"],
                name="split_prompts",
            ),
        ]
    )
