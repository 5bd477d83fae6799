"""Reference pipeline: calibration / holdout prompts → teacher trajectories + summary."""

from kedro.pipeline import Node, Pipeline

from budcache_pipeline.pipelines.reference.nodes import (
    compute_calibration_reference,
    compute_holdout_reference,
    summarise_references,
)


def create_pipeline(**kwargs: object) -> Pipeline:
    return Pipeline(
        [
            Node(
                compute_calibration_reference,
                inputs=["calibration_prompts", "model", "params:reference"],
                outputs="reference_calibration",
                name="compute_calibration_reference",
            ),
            Node(
                compute_holdout_reference,
                inputs=["holdout_prompts", "model", "params:reference"],
                outputs="reference_holdout",
                name="compute_holdout_reference",
            ),
            Node(
                summarise_references,
                inputs=["reference_calibration", "reference_holdout"],
                outputs="reference_summary@json",
                name="summarise_references",
            ),
        ]
    )
