"""The `budcache generate` command: a grid from any adapter's stock pipeline, optionally under a policy."""

import json

import pytest
from PIL import Image

from budcache_pipeline.console import main
from budcache_pipeline.models.spec import load_adapter
from budcache_pipeline.policy import CachePolicy, model_fingerprint

TINY_FLUX = {"adapter": "flux", "weights": "tiny", "device": "cpu", "steps": 6}


def _config(tmp_path, block):
    path = tmp_path / "model.yml"
    path.write_text(json.dumps(block))
    return str(path)


def test_generate_draws_the_default_model_uncached(tmp_path, capsys):
    out = tmp_path / "grids" / "seven.png"
    assert main(["generate", "--prompt", "a handwritten seven", "--steps", "4", "--images", "3", "--out", str(out)]) == 0
    assert "3 images of 'a handwritten seven', 4 of 4 steps computed" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size[0] > image.size[1] > 0


def test_generate_under_a_policy_computes_only_its_budget(tmp_path, capsys):
    tiny = load_adapter(TINY_FLUX)
    size = tiny.tiny_size
    policy = CachePolicy(
        mask=[True, False, True, False, True, False],
        model_name="tiny-flux",
        model_fingerprint=model_fingerprint(tiny.transformer),
        sigmas=tiny.default_sigmas(6, size),
    )
    policy_path = tmp_path / "budget_3.json"
    policy.save(policy_path)
    config = _config(tmp_path, {"model": TINY_FLUX})
    out = tmp_path / "grid.png"
    args = ["generate", "--prompt", "a lighthouse", "--model-config", config, "--images", "2", "--out", str(out)]
    assert main([*args, "--policy", str(policy_path)]) == 0
    assert "3 of 6 steps computed the block stack" in capsys.readouterr().out
    assert out.is_file()

    assert main([*args, "--policy", str(policy_path), "--steps", "8"]) == 2
    assert "policy has 6 steps, this job runs 8" in capsys.readouterr().err


@pytest.mark.parametrize("content", [{"models": {}}, ["model"]])
def test_generate_refuses_a_config_without_a_model_block(tmp_path, capsys, content):
    config = _config(tmp_path, content)
    assert main(["generate", "--prompt", "a", "--model-config", config, "--out", str(tmp_path / "g.png")]) == 2
    assert "has no `model:` block" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
