"""The MLflow policy registry: log runs, register policy ladders, promote, pull, verify.

A registered model holds one ladder of policies (one per budget) for one model and one
number of steps. Each version is an MLflow pyfunc model logged from code whose artifacts
are plain policy JSON and their checksums, so nothing is ever unpickled; the sha256 of
every file is kept in the registry database and checked on every download. Aliases carry
the lifecycle: `candidate` on registration, `production` only through the quality gate.

One module per concern: `store` (URIs, client, lookups), `ladder` (ladder folders),
`tracking` (runs and registration), `verification` (digests, `verify`), `promotion`
(the gate and the alias) and `pull`.
"""

from budcache_pipeline.registry.ladder import load_ladder, pick_policy, write_ladder
from budcache_pipeline.registry.promotion import (
    PromotionResult,
    alias_history,
    format_promotion,
    promote,
)
from budcache_pipeline.registry.pull import pull
from budcache_pipeline.registry.store import (
    CANDIDATE_ALIAS,
    DEFAULT_EXPERIMENT,
    PRODUCTION_ALIAS,
    RegistryError,
    find_project_root,
    registered_model_name,
    resolve_tracking_uri,
)
from budcache_pipeline.registry.tracking import (
    MODEL_ARTIFACT,
    POLICIES_ARTIFACT,
    RegisteredLadder,
    code_version,
    log_run,
    register_ladder,
)
from budcache_pipeline.registry.verification import (
    DIGEST_TAG_PREFIX,
    VerificationResult,
    verify,
)

__all__ = [
    "CANDIDATE_ALIAS",
    "DEFAULT_EXPERIMENT",
    "DIGEST_TAG_PREFIX",
    "MODEL_ARTIFACT",
    "POLICIES_ARTIFACT",
    "PRODUCTION_ALIAS",
    "PromotionResult",
    "RegisteredLadder",
    "RegistryError",
    "VerificationResult",
    "alias_history",
    "code_version",
    "find_project_root",
    "format_promotion",
    "load_ladder",
    "log_run",
    "pick_policy",
    "promote",
    "pull",
    "register_ladder",
    "registered_model_name",
    "resolve_tracking_uri",
    "verify",
    "write_ladder",
]
