"""Kedro project settings, and the budget ladder that shapes the pipelines.

Kedro builds pipelines before it loads parameters, so anything that changes the
pipeline's structure (one namespaced `search` copy per budget) is set here.
"""

from kedro.config import OmegaConfigLoader

from budcache_pipeline.hooks import ModelHooks

BUDGETS: list[int] = [14, 10, 7, 5, 4, 3]
"""Compute-step budgets to search, one namespaced pipeline copy (`budget_<B>`) each; dvc.yaml reads
this list too (one `search@B` and `align@B` stage each), which is why it is a list: DVC takes no tuples."""

HOOKS = (ModelHooks(),)
"""`ModelHooks` makes the catalog entry `model` from the `model:` parameters."""

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # An environment (conf/tiny_flux, conf/local) overrides only the parameters it names.
    "merge_strategy": {"parameters": "soft", "globals": "soft"},
}
