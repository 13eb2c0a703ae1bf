"""Behaviour of diffusion_gym.rewards: JPEG sizes, the registry, the LAION scorer, digit confidence."""

from __future__ import annotations

import ast
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion_gym import rewards
from diffusion_gym.models import MissingWeightsError

# --------------------------------------------------------------------------------------------------
# JPEG
# --------------------------------------------------------------------------------------------------


def reference_kb(image: torch.Tensor, mode: str) -> float:
    """Encode one (C, H, W) image in [0, 1] the ddpo-pytorch way, independently of the module."""
    pixels = (image * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    pil = Image.fromarray(pixels[0] if mode == "L" else pixels.transpose(1, 2, 0))
    assert pil.mode == mode
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


@pytest.fixture
def restore_pool():
    yield
    rewards.set_jpeg_workers(4)


@pytest.mark.parametrize(("channels", "mode", "size"), [(1, "L", 16), (3, "RGB", 32)])
def test_jpeg_rewards_match_pil_exactly(channels, mode, size):
    gen = torch.Generator().manual_seed(channels)
    # Smooth gradients plus noise, with values exactly between two uint8 levels to exercise rounding.
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size).expand(3, channels, size, size)
    noise = torch.rand(3, channels, size, size, generator=gen)
    images = (0.5 * ramp + 0.5 * noise * torch.tensor([0.0, 0.3, 1.0]).view(3, 1, 1, 1)).clamp(0, 1)
    images[0, :, 0, 0] = 100.5 / 255
    expected = torch.tensor([reference_kb(img, mode) for img in images], dtype=torch.float32)

    sizes = rewards.jpeg_size_kb(images)
    assert sizes.dtype == torch.float32 and sizes.shape == (3,)
    assert torch.equal(sizes, expected)

    incompressibility = rewards.make_reward("jpeg_incompressibility")
    compressibility = rewards.make_reward("jpeg_compressibility")
    assert torch.equal(incompressibility(images, None), expected)
    assert torch.equal(compressibility(images, ["a prompt"] * 3), -expected)
    assert (expected > 0).all()
    # more noise -> bigger file
    assert expected[0] < expected[1] < expected[2]


def test_flat_image_is_more_compressible_than_noise():
    flat = torch.full((1, 3, 64, 64), 0.4)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reward = rewards.make_reward("jpeg_compressibility")
    flat_r, noise_r = reward(torch.cat([flat, noise]), None).tolist()
    assert flat_r > noise_r
    assert -flat_r < 2.0 < -noise_r  # a flat 64×64 JPEG is ~1 kB, noise is several kB


def test_jpeg_thread_pool_preserves_batch_order(restore_pool):
    gen = torch.Generator().manual_seed(1)
    # 24 images whose noise level (and so JPEG size) differs, in shuffled order.
    levels = torch.linspace(0, 1, 24)[torch.randperm(24, generator=gen)]
    images = (0.5 + (torch.rand(24, 1, 32, 32, generator=gen) - 0.5) * levels.view(-1, 1, 1, 1)).clamp(0, 1)
    expected = torch.tensor([reference_kb(img, "L") for img in images], dtype=torch.float32)
    assert len(set(expected.tolist())) > 20  # the sizes really tell the images apart

    rewards.set_jpeg_workers(6)
    pooled = rewards.jpeg_size_kb(images)
    assert torch.equal(pooled, expected)
    perm = torch.randperm(24, generator=gen)
    assert torch.equal(rewards.jpeg_size_kb(images[perm]), expected[perm])

    rewards.set_jpeg_workers(1)
    assert torch.equal(rewards.jpeg_size_kb(images), expected)
    with pytest.raises(ValueError, match="num_workers"):
        rewards.set_jpeg_workers(0)


def test_jpeg_rejects_bad_shapes():
    with pytest.raises(ValueError, match="B, 1 or 3, H, W"):
        rewards.jpeg_size_kb(torch.rand(2, 4, 8, 8))
    with pytest.raises(ValueError, match="B, 1 or 3, H, W"):
        rewards.jpeg_size_kb(torch.rand(3, 8, 8))


@pytest.mark.parametrize("name", ["jpeg_compressibility", "jpeg_incompressibility"])
@pytest.mark.parametrize("quality", [0, 101, 500, 3.5, True, "95", None])
def test_jpeg_quality_is_checked_when_the_reward_is_built(name, quality):
    message = rf"JPEG quality must be an integer in \[1, 100\], got {re.escape(repr(quality))}"
    with pytest.raises(ValueError, match=message):
        rewards.make_reward(name, quality=quality)


def test_jpeg_quality_in_range_sets_the_encoding():
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    for quality in (1, 50, 100, np.int64(75)):
        expected = rewards.jpeg_size_kb(images, int(quality))
        assert torch.equal(rewards.make_reward("jpeg_incompressibility", quality=quality)(images, None), expected)
        assert torch.equal(rewards.make_reward("jpeg_compressibility", quality=quality)(images, None), -expected)
    assert not torch.equal(rewards.jpeg_size_kb(images, 1), rewards.jpeg_size_kb(images, 100))


# --------------------------------------------------------------------------------------------------
# Registry and make_reward
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def isolated_registry(monkeypatch):
    monkeypatch.setattr(rewards.registry, "_REGISTRY", dict(rewards.registry._REGISTRY))


def test_available_rewards_sorted_and_complete():
    names = rewards.available_rewards()
    assert names == sorted(names)
    assert {"jpeg_compressibility", "jpeg_incompressibility", "laion_aesthetic", "digit_confidence"} <= set(names)


def test_unknown_reward_lists_choices():
    with pytest.raises(ValueError) as info:
        rewards.make_reward("foo")
    message = str(info.value)
    assert "'foo'" in message
    for name in rewards.available_rewards():
        assert name in message


def test_register_twice_needs_overwrite(isolated_registry):
    def factory():
        return lambda images, conditions: images.mean(dim=(1, 2, 3))

    rewards.register_reward("brightness", factory)
    assert "brightness" in rewards.available_rewards()
    with pytest.raises(ValueError, match="already registered"):
        rewards.register_reward("brightness", factory)
    rewards.register_reward(
        "brightness", lambda: lambda images, conditions: -images.mean(dim=(1, 2, 3)), overwrite=True
    )
    images = torch.rand(3, 1, 4, 4)
    assert torch.allclose(rewards.make_reward("brightness")(images, None), -images.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="already registered"):
        rewards.register_reward("jpeg_compressibility", factory)


def test_valid_user_callable_is_wrapped():
    def brightness(images, conditions):
        return images.double().mean(dim=(1, 2, 3))

    reward = rewards.make_reward(brightness)
    images = torch.rand(4, 3, 8, 8)
    out = reward(images, None)
    assert out.dtype == torch.float32 and out.shape == (4,) and out.device == images.device
    assert torch.allclose(out, images.mean(dim=(1, 2, 3)))
    assert rewards.make_reward(reward) is reward  # already checked: not wrapped twice
    # array-likes are accepted and converted
    numpy_reward = rewards.make_reward(lambda images, conditions: np.arange(images.shape[0]))
    assert torch.equal(numpy_reward(images, None), torch.arange(4, dtype=torch.float32))


def test_user_callable_wrong_shape_is_a_clear_error():
    def per_pixel(images, conditions):
        return images.mean(dim=(2, 3))  # (B, C): forgot to reduce the channels

    with pytest.raises(ValueError, match=r"reward '.*per_pixel' returned shape \(4, 3\), expected \(4,\)"):
        rewards.make_reward(per_pixel)(torch.rand(4, 3, 8, 8), None)
    with pytest.raises(ValueError, match=r"returned shape \(\), expected \(4,\)"):
        rewards.make_reward(lambda images, conditions: images.mean())(torch.rand(4, 3, 8, 8), None)


def test_user_callable_nan_is_a_clear_error():
    def broken(images, conditions):
        out = images.mean(dim=(1, 2, 3))
        out[2] = float("nan")
        out[0] = float("inf")
        return out

    with pytest.raises(ValueError, match=r"reward '.*broken' returned non-finite values .* indices \[0, 2\]"):
        rewards.make_reward(broken)(torch.rand(4, 1, 8, 8), None)


def test_images_outside_unit_range_are_rejected():
    reward = rewards.make_reward("jpeg_compressibility")
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        reward(torch.rand(2, 3, 8, 8) * 2 - 1, None)
    with pytest.raises(ValueError, match="B, 1 or 3, H, W"):
        reward(torch.rand(2, 8, 8), None)


def test_kwargs_only_for_names():
    with pytest.raises(ValueError, match="registered reward name"):
        rewards.make_reward(lambda images, conditions: images.mean(dim=(1, 2, 3)), scale=2)
    with pytest.raises(ValueError, match="registered name, a mapping of names to weights or a callable"):
        rewards.make_reward(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# LAION aesthetic (random weights of the real shapes)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer():
    torch.manual_seed(0)
    return rewards.LaionAestheticScorer(random_init=True)


def test_aesthetic_mlp_shapes_and_state_dict_keys(scorer):
    linears = [m for m in scorer.mlp.layers if isinstance(m, torch.nn.Linear)]
    widths = [(m.in_features, m.out_features) for m in linears]
    assert widths == [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    dropouts = [m.p for m in scorer.mlp.layers if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.2, 0.2, 0.1]
    assert len(scorer.mlp.layers) == 8  # no activation layers
    expected = {f"layers.{i}.{kind}" for i in (0, 2, 4, 6, 7) for kind in ("weight", "bias")}
    assert set(scorer.mlp.state_dict()) == expected
    assert scorer.visual.output_dim == 768
    assert not any(p.requires_grad for p in scorer.parameters())
    scorer.train()
    assert not scorer.training and not scorer.mlp.training  # dropout stays off


def test_random_init_is_deterministic_under_manual_seed(scorer):
    torch.manual_seed(0)
    again = rewards.LaionAestheticScorer(random_init=True)
    reference = scorer.state_dict()
    rebuilt = again.state_dict()
    assert reference.keys() == rebuilt.keys()
    assert all(torch.equal(reference[k], rebuilt[k]) for k in reference)
    # and the weights are not trivially constant
    assert reference["mlp.layers.0.weight"].std() > 0


def test_aesthetic_forward_normalises_embedding_and_backpropagates(scorer):
    # One (costly) ViT-L forward + backward on CPU covers: shape, dtype, finiteness, 1-channel input,
    # the L2 normalisation of the embedding and gradients reaching the images.
    captured = {}
    handle = scorer.visual.register_forward_hook(lambda module, args, output: captured.setdefault("embed", output))
    reward = rewards.make_reward("laion_aesthetic", scorer=scorer, differentiable=True)
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)).mul(0.8).add(0.1)
    images.requires_grad_(True)
    try:
        out = reward(images, ["a prompt", "another"])
    finally:
        handle.remove()
    assert out.shape == (2,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.requires_grad
    assert reward.scorer is scorer

    embed = captured["embed"].detach().float()
    assert embed.shape == (2, 768)
    assert not torch.allclose(embed.norm(dim=-1), torch.ones(2))  # the raw embedding is not unit-norm ...
    with torch.no_grad():
        expected = scorer.mlp(F.normalize(embed, dim=-1)).squeeze(-1)
        assert torch.allclose(out.detach(), expected, atol=1e-5)  # ... the MLP sees the normalised one
        assert torch.allclose(scorer.score_embeddings(embed * 7.5), out.detach(), atol=1e-5)
        assert torch.allclose(scorer.score_embeddings(embed / 1000), out.detach(), atol=1e-5)

    out.sum().backward()
    grad = images.grad
    assert grad is not None and grad.shape == images.shape
    assert torch.isfinite(grad).all()
    assert (grad.abs().flatten(1).sum(dim=1) > 0).all()  # each image gets a gradient
    assert all(p.grad is None for p in scorer.parameters())  # the scorer itself stays frozen


class TinyScorer(torch.nn.Module):
    """Stands in for the scorer where only the reward wrapper is under test (no ViT-L forward)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, images):
        return images.mean(dim=(1, 2, 3)) * self.scale


def test_laion_aesthetic_reward_has_no_graph_by_default():
    images = torch.rand(3, 3, 8, 8, requires_grad=True)
    plain = rewards.make_reward("laion_aesthetic", scorer=TinyScorer())
    out = plain(images, None)
    assert out.shape == (3,) and not out.requires_grad
    assert rewards.make_reward("laion_aesthetic", scorer=TinyScorer(), differentiable=True)(images, None).requires_grad
    with pytest.raises(ValueError, match="not both"):
        rewards.make_reward("laion_aesthetic", scorer=TinyScorer(), random_init=True)


def test_aesthetic_preprocess_grey_and_size(scorer):
    grey = torch.rand(2, 1, 16, 16)
    pixels = scorer.preprocess(grey)
    assert pixels.shape == (2, 3, 224, 224)
    assert torch.allclose(pixels, scorer.preprocess(grey.expand(-1, 3, -1, -1)))
    # non-square input: shorter side to 224, centre crop
    assert scorer.preprocess(torch.rand(1, 3, 20, 60)).shape == (1, 3, 224, 224)
    # CLIP normalisation: mid-grey maps to (0.5 - mean) / std
    mid = scorer.preprocess(torch.full((1, 3, 224, 224), 0.5))
    expected = (0.5 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    assert torch.allclose(mid[0, :, 100, 100], expected, atol=1e-5)


@pytest.fixture
def empty_hf_env(monkeypatch, tmp_path):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv(rewards.AESTHETIC_MLP_ENV, raising=False)
    monkeypatch.delenv(rewards.CLIP_WEIGHTS_ENV, raising=False)
    return cache


def test_missing_weights_error_names_files_and_remedy(empty_hf_env, tmp_path):
    other_cache = tmp_path / "explicit-cache"
    other_cache.mkdir()
    for kwargs, cache in (({}, empty_hf_env), ({"cache_dir": str(other_cache)}, other_cache)):
        with pytest.raises(MissingWeightsError) as info:
            rewards.LaionAestheticScorer(**kwargs)
        message = str(info.value)
        assert rewards.AESTHETIC_MLP_FILENAME in message
        assert "open_clip_model.safetensors" in message and "timm/vit_large_patch14_clip_224.openai" in message
        assert str(cache) in message
        assert "hf download" in message
        assert rewards.AESTHETIC_MLP_ENV in message and "mlp_weights=" in message and "clip_weights=" in message
    # the registered factory fails the same way, through make_reward
    with pytest.raises(MissingWeightsError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        rewards.make_reward("laion_aesthetic")


def test_missing_explicit_paths(empty_hf_env, tmp_path, monkeypatch):
    missing = tmp_path / "nope.pth"
    with pytest.raises(MissingWeightsError, match="nope.pth"):
        rewards.LaionAestheticScorer(mlp_weights=missing)
    monkeypatch.setenv(rewards.AESTHETIC_MLP_ENV, str(missing))
    with pytest.raises(MissingWeightsError, match=rf"{rewards.AESTHETIC_MLP_ENV}.*nope.pth|nope.pth.*"):
        rewards.LaionAestheticScorer()


def _fake_hub_file(cache, repo_id, filename, write):
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0" * 40)
    write(snapshot / filename)
    return snapshot / filename


def test_weights_are_found_in_the_hf_cache(empty_hf_env):
    torch.manual_seed(3)
    mlp = rewards.AestheticMLP()
    repo_id, filename = rewards.AESTHETIC_MLP_HUB_FILES[0]
    assert filename == rewards.AESTHETIC_MLP_FILENAME
    mlp_file = _fake_hub_file(empty_hf_env, repo_id, filename, lambda p: torch.save(mlp.state_dict(), p))

    # With the MLP cached, only the CLIP weights are reported missing.
    with pytest.raises(MissingWeightsError) as info:
        rewards.LaionAestheticScorer()
    assert "open_clip_model.safetensors" in str(info.value)
    assert "aesthetic MLP" not in str(info.value)

    path, missing = rewards._resolve_mlp_weights(None, str(empty_hf_env))
    assert path is not None and missing == "" and path.endswith(filename)
    loaded = rewards.AestheticMLP()
    loaded.load_state_dict(rewards._load_mlp_state(path), strict=True)
    assert torch.equal(loaded.layers[0].weight, mlp.layers[0].weight)
    assert mlp_file.is_file()

    clip_repo, clip_file = rewards.clip_hub_files()[0]
    _fake_hub_file(empty_hf_env, clip_repo, clip_file, lambda p: p.write_bytes(b"placeholder"))
    path, missing = rewards._resolve_clip_weights(None, str(empty_hf_env))
    assert path is not None and path.endswith(clip_file) and missing == ""


# --------------------------------------------------------------------------------------------------
# Digit classifier confidence
# --------------------------------------------------------------------------------------------------


def _require_classifier():
    from diffusion_gym.digits import CLASSIFIER_DIR

    if not (CLASSIFIER_DIR / "config.json").is_file():
        pytest.skip(f"digit classifier not shipped yet ({CLASSIFIER_DIR / 'config.json'} is missing)")


def test_digit_confidence_on_real_digits():
    _require_classifier()
    from diffusion_gym.digits import load_digits_dataset

    images, labels = load_digits_dataset()
    reward = rewards.make_reward("digit_confidence")
    right = reward(images, labels)
    wrong = reward(images, (labels + 1) % 10)
    assert right.shape == (len(labels),) and right.dtype == torch.float32
    assert ((right >= 0) & (right <= 1)).all()
    assert right.mean() > 0.9
    assert wrong.mean() < 0.2
    # a plain list of ints works too
    assert torch.allclose(reward(images[:5], labels[:5].tolist()), right[:5], atol=1e-6)


def test_digit_confidence_needs_class_ids():
    _require_classifier()
    reward = rewards.make_reward("digit_confidence")
    images = torch.rand(3, 1, 16, 16)
    with pytest.raises(ValueError, match="class-id conditions.*None"):
        reward(images, None)
    with pytest.raises(ValueError, match="class-id conditions"):
        reward(images, ["a cat", "a dog", "a bird"])
    with pytest.raises(ValueError, match="class-id conditions.*shape"):
        reward(images, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="class-id conditions.*values"):
        reward(images, torch.tensor([1, 2, 10]))


# --------------------------------------------------------------------------------------------------
# Module layout: diffusion_gym.rewards.* and diffusion_gym.nets
# --------------------------------------------------------------------------------------------------

PACKAGE_DIR = Path(rewards.__file__).resolve().parents[1]  # diffusion_gym/


def _module_files() -> dict[str, Path]:
    """Every module of diffusion_gym by dotted name (a package by its ``__init__.py``)."""
    files = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _imported_names(module: str, path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of each import in ``path``, anywhere in it (functions too), made absolute."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def _import_graph(with_parents: bool) -> dict[str, set[str]]:
    """Edges module → the diffusion_gym modules it imports.

    With ``with_parents``, importing ``a.b.c`` also runs the packages ``a`` and ``a.b``, which are
    added as edges (what really gets imported); without, only the most specific module is.
    """
    files = _module_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        edges = graph.setdefault(module, set())
        for base, names in _imported_names(module, path):
            submodules = {f"{base}.{name}" for name in names} & files.keys()
            targets = submodules or ({base} & files.keys())
            edges.update(targets)
            if with_parents:
                for target in targets:
                    parts = target.split(".")
                    edges.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in files)
        edges.discard(module)
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_nets_imports_nothing_from_rewards():
    graph = _import_graph(with_parents=True)
    assert {"diffusion_gym.nets", "diffusion_gym.rewards", "diffusion_gym.rewards.registry"} <= graph.keys()
    assert "diffusion_gym.nets" in graph["diffusion_gym.rewards.aesthetic"]  # the graph does see imports
    from_nets = _reachable(graph, "diffusion_gym.nets")
    assert not {m for m in from_nets if m == "diffusion_gym.rewards" or m.startswith("diffusion_gym.rewards.")}


def test_feature_nets_is_gone_and_the_rewards_modules_form_no_cycle():
    graph = _import_graph(with_parents=False)
    assert "diffusion_gym.feature_nets" not in graph
    repo = PACKAGE_DIR.parent
    importers = [
        path
        for folder in ("diffusion_gym", "agents", "benchmarks", "examples", "scripts", "tests")
        for path in (repo / folder).rglob("*.py")
        for base, names in _imported_names("_", path)
        if "feature_nets" in base or "feature_nets" in names
    ]
    assert not importers, f"diffusion_gym.feature_nets is now diffusion_gym.nets; still imported by {importers}"
    submodules = {m for m in graph if m.startswith("diffusion_gym.rewards.")} | {"diffusion_gym.nets"}
    assert {"host", "jpeg", "registry", "aesthetic", "digits"} <= {m.rpartition(".")[2] for m in submodules}
    sub = {m: graph[m] & submodules for m in submodules}
    for module in submodules:
        assert module not in _reachable(sub, module), f"{module} imports itself through a cycle"


def test_public_names_are_reexported():
    from diffusion_gym import nets
    from diffusion_gym.rewards import aesthetic, host, jpeg, registry

    for name in rewards.__all__:
        assert getattr(rewards, name) is not None
    assert rewards.ClipImageEncoder is nets.ClipImageEncoder and rewards.CLIP_WEIGHTS_ENV == nets.CLIP_WEIGHTS_ENV
    assert rewards.make_reward is registry.make_reward and rewards._REGISTRY is registry._REGISTRY
    assert rewards.reward_async is host.reward_async and rewards.jpeg_size_kb is jpeg.jpeg_size_kb
    assert rewards.LaionAestheticScorer is aesthetic.LaionAestheticScorer


def test_nan_images_are_refused_not_scored():
    """A diverged chain's NaN images pass [0, 1] clamping; the reward must refuse them, not score them."""
    reward = rewards.make_reward("jpeg_compressibility")
    images = torch.full((2, 1, 8, 8), 0.5)
    images[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        reward(images)
