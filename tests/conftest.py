"""Tiny diffusers models with random weights, built from configs: no downloads, fp32, CPU; and
the edits an attacker with write access to a local artifact store makes to a registered ladder.

Two environment variables check the determinism promise (README, "Determinism"):
`BUDCACHE_TEST_THREADS` (default 1) is torch's thread count for the whole session, and
every test starts at it; `BUDCACHE_TEST_SHUFFLE_SEED`, when set, runs the modules in a
shuffled order and the tests of each module in a shuffled order (a module's tests stay
together, so module fixtures are built once). Unset, the order is the files' order.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _threads() -> int:
    text = os.environ.get("BUDCACHE_TEST_THREADS", "1")
    if not text.isdigit() or int(text) < 1:
        raise pytest.UsageError(f"BUDCACHE_TEST_THREADS must be a positive integer, got {text!r}")
    return int(text)


THREADS = _threads()
SHUFFLE_SEED = os.environ.get("BUDCACHE_TEST_SHUFFLE_SEED") or None
torch.set_num_threads(THREADS)


def pytest_report_header(config):
    order = f"shuffled with seed {SHUFFLE_SEED!r}" if SHUFFLE_SEED else "file order"
    return f"budcache: {THREADS} torch thread(s), tests in {order}"


END_TO_END_FIXTURES = frozenset({"reduced_run", "tiny_runs"})


def pytest_itemcollected(item):
    """A test on a whole Kedro run of a project copy is end to end: marked slow, so `make test-fast` leaves it out."""
    if END_TO_END_FIXTURES & set(getattr(item, "fixturenames", ())):
        item.add_marker(pytest.mark.slow)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    if SHUFFLE_SEED is None:
        return
    rng = random.Random(SHUFFLE_SEED)
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    order = list(modules.values())
    rng.shuffle(order)
    for group in order:
        rng.shuffle(group)
    items[:] = [item for group in order for item in group]


@pytest.fixture(autouse=True)
def _session_torch_threads():
    """Code under test may set torch's global thread count (a `ModelHandle` does): undo it after each test."""
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_pipeline(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
    ).eval()


def model_artifacts(uri: str, name: str, version: str) -> Path:
    """The folder of a registered version in the local artifact store, where an attacker edits it."""
    from mlflow import MlflowClient

    return Path(urlparse(MlflowClient(uri, uri).get_model_version_download_uri(name, version)).path)


def move_compute_step(path: Path) -> None:
    """Move a policy's last compute step to its last cached step: still a valid, canonical policy at the
    same budget, so only a digest can tell."""
    from budcache_pipeline.policy import CachePolicy

    data = json.loads(path.read_text())
    mask = data["mask"]
    computed = max(i for i, m in enumerate(mask) if m and i > 0)
    cached = max(i for i, m in enumerate(mask) if not m)
    mask[computed], mask[cached] = False, True
    path.write_text(CachePolicy.from_dict(data).to_json())


def rewrite_checksums(ladder: Path) -> None:
    """Recompute `SHA256SUMS` for the policies now in `ladder`, as an attacker does after editing them."""
    from budcache_pipeline.policy_ladder_model import CHECKSUMS_FILE, checksums_text

    files = {p.name: p.read_bytes() for p in ladder.glob("budget_*.json")}
    (ladder / CHECKSUMS_FILE).write_text(checksums_text(files))


@pytest.fixture
def flux_pipe():
    return tiny_flux_pipeline()


@pytest.fixture
def wan_pipe():
    return tiny_wan_pipeline()


@pytest.fixture(scope="session")
def reduced_run(tmp_path_factory):
    """A copy of the project after one full `kedro run` on the reduced configuration of
    `tests/reduced_project.py`, with its own sqlite registry; shared by the pipeline, notebook
    and deployment tests so the suite pays for one run."""
    from tests.reduced_project import kedro, reduced_project

    project = reduced_project(tmp_path_factory.mktemp("reduced") / "project")
    kedro(project, "run")
    return project


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """`tiny_runs(name)`: (project, environment) of a copy after one sequential `kedro run --env
    tiny_<name>` at budgets `TINY_BUDGETS`, run once per adapter per session (the tiny-environment,
    runner and DAG tests share it)."""
    from tests.reduced_project import TINY_BUDGETS, environment, kedro, tiny_project

    done: dict[str, tuple] = {}

    def tiny_run(name: str) -> tuple:
        if name not in done:
            project = tiny_project(tmp_path_factory.mktemp(f"tiny_{name}") / "project")
            env = environment(project, budgets=TINY_BUDGETS)
            kedro(project, "run", "--env", f"tiny_{name}", env=env)
            done[name] = (project, env)
        return done[name]

    return tiny_run
