"""diffusion_gym.nets: InceptionV3 (features + head), the CLIP image encoder (features), load_metric_nets."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

from diffusion_gym import metrics, nets, rewards
from diffusion_gym.models import MissingWeightsError


@pytest.fixture
def no_inception_env(monkeypatch, tmp_path):
    """An empty torch hub directory and no weights variable: the InceptionV3 weights are missing."""
    hub = tmp_path / "torch-hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.delenv(nets.INCEPTION_WEIGHTS_ENV, raising=False)
    return hub


def _images(n, channels, size, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_random_init_inception_features_head_and_classifier_outputs():
    torch.manual_seed(0)
    net = nets.load_inception_v3(random_init=True)
    assert isinstance(net, nets.InceptionV3Features)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training and not net.network.training

    images = _images(2, 3, 32)
    with torch.no_grad():
        feats = net.features(images)
        logits = net.head(feats)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    # grey images are repeated to 3 channels; all are resized to 299 and mapped to [-1, 1]
    grey = images[:, :1]
    pixels = net.preprocess(grey)
    assert pixels.shape == (2, 3, 299, 299) and torch.equal(pixels, net.preprocess(grey.expand(-1, 3, -1, -1)))
    assert torch.allclose(net.preprocess(torch.full((1, 3, 299, 299), 0.75)), torch.full((1, 3, 299, 299), 0.5))

    out = metrics.classifier_outputs(net, images)
    assert out.probs.shape == (2, 1000) and out.features.shape == (2, 2048)
    assert torch.allclose(out.probs.sum(-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(out.features, feats, atol=1e-5)
    assert torch.allclose(out.probs, logits.softmax(-1), atol=1e-6)

    with pytest.raises(ValueError, match="N, 1 or 3, H, W"):
        net.features(torch.rand(2, 2, 8, 8))


def test_torchvision_state_dict_loads_and_matches_torchvision(tmp_path):
    torch.manual_seed(1)
    # torchvision's pretrained InceptionV3 is built with the auxiliary classifier and transform_input=True.
    reference = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    for module in reference.modules():  # non-trivial batch-norm statistics, so that they must be loaded too
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    reference.eval()
    path = tmp_path / nets.INCEPTION_WEIGHTS_FILENAME
    torch.save(reference.state_dict(), path)
    assert any(k.startswith("AuxLogits.") for k in reference.state_dict())

    torch.manual_seed(2)  # different random weights before loading: equality below comes from the file
    net = nets.load_inception_v3(weights=path)

    images = _images(2, 3, 40, seed=3)
    # torchvision's pipeline for these weights: resize to 299, ImageNet normalisation, transform_input.
    transform = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1.transforms()
    resized = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor(transform.mean).view(1, 3, 1, 1), torch.tensor(transform.std).view(1, 3, 1, 1)
    normalised = (resized - mean) / std
    pooled = {}
    handle = reference.avgpool.register_forward_hook(lambda module, args, output: pooled.setdefault("x", output))
    with torch.no_grad():
        try:
            expected_logits = reference(normalised)
        finally:
            handle.remove()
        feats = net.features(images)
        logits = net.head(feats)
    assert torch.allclose(feats, pooled["x"].flatten(1), atol=1e-4, rtol=1e-4)
    assert torch.allclose(logits, expected_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(net.network.fc.weight, reference.fc.weight)


def test_missing_inception_weights_error(no_inception_env, tmp_path, monkeypatch):
    expected = no_inception_env / "checkpoints" / nets.INCEPTION_WEIGHTS_FILENAME
    assert nets.default_inception_weights_path() == expected
    with pytest.raises(MissingWeightsError) as info:
        nets.load_inception_v3()
    message = str(info.value)
    assert "inception_v3_google-0cc3c7bd.pth" in message and str(expected) in message
    assert nets.INCEPTION_WEIGHTS_URL in message and "--inception-weights" in message
    assert nets.INCEPTION_WEIGHTS_ENV in message

    missing = tmp_path / "elsewhere.pth"
    with pytest.raises(MissingWeightsError, match="elsewhere.pth"):
        nets.load_inception_v3(missing)
    monkeypatch.setenv(nets.INCEPTION_WEIGHTS_ENV, str(missing))
    with pytest.raises(MissingWeightsError, match=rf"elsewhere.pth.*\${nets.INCEPTION_WEIGHTS_ENV}"):
        nets.load_inception_v3()


def test_inception_weights_lookup_order(no_inception_env, tmp_path, monkeypatch):
    cached = no_inception_env / "checkpoints" / nets.INCEPTION_WEIGHTS_FILENAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"placeholder")
    assert nets._resolve_inception_weights(None) == cached
    from_env = tmp_path / "env.pth"
    from_env.write_bytes(b"placeholder")
    monkeypatch.setenv(nets.INCEPTION_WEIGHTS_ENV, str(from_env))
    assert nets._resolve_inception_weights(None) == from_env
    explicit = tmp_path / "explicit.pth"
    explicit.write_bytes(b"placeholder")
    assert nets._resolve_inception_weights(explicit) == explicit


def test_random_init_clip_encoder_features():
    torch.manual_seed(0)
    encoder = nets.load_clip_image_encoder(random_init=True)
    assert isinstance(encoder, nets.ClipImageEncoder) and not hasattr(encoder, "head")
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    with torch.no_grad():
        feats = encoder.features(_images(1, 1, 16))  # one image: a ViT-L forward is costly on CPU
    assert feats.shape == (1, 768) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert not torch.allclose(feats.norm(dim=-1), torch.ones(1))  # unnormalised
    assert issubclass(rewards.LaionAestheticScorer, nets.ClipImageEncoder)


def test_missing_clip_weights_error(monkeypatch, tmp_path):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv(nets.CLIP_WEIGHTS_ENV, raising=False)
    with pytest.raises(MissingWeightsError) as info:
        nets.load_clip_image_encoder()
    message = str(info.value)
    assert "open_clip_model.safetensors" in message and str(cache) in message
    assert "clip_weights=" in message and nets.CLIP_WEIGHTS_ENV in message
    assert rewards.AESTHETIC_MLP_FILENAME not in message  # only the CLIP file is needed here
    with pytest.raises(MissingWeightsError, match="nope.safetensors"):
        nets.load_clip_image_encoder(tmp_path / "nope.safetensors")


def _require_classifier():
    from diffusion_gym.digits import CLASSIFIER_DIR

    if not (CLASSIFIER_DIR / "config.json").is_file():
        pytest.skip(f"digit classifier not shipped yet ({CLASSIFIER_DIR / 'config.json'} is missing)")


def test_metric_nets_digits_and_auto():
    _require_classifier()
    from diffusion_gym.digits import load_digits_dataset

    loaded = nets.load_metric_nets("digits")
    assert loaded.classifier is loaded.embedder
    assert (loaded.classifier_name, loaded.embedder_name) == ("digit-classifier", "digit-classifier")
    images, labels = load_digits_dataset()
    images = images[:8]
    out = metrics.classifier_outputs(loaded.classifier, images)
    assert out.probs.shape == (8, 10) and out.features.shape[0] == 8
    assert torch.allclose(out.probs.sum(-1), torch.ones(8), atol=1e-5)
    assert (out.probs.argmax(-1) == labels[:8].to(out.probs.device)).float().mean() >= 0.75

    auto = nets.load_metric_nets(image_shape=(1, 16, 16))
    assert auto.classifier_name == "digit-classifier"


def test_metric_nets_inception_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(
        nets, "load_inception_v3", lambda weights, **kw: calls.append(("inception", weights, kw)) or "I"
    )
    monkeypatch.setattr(
        nets, "load_clip_image_encoder", lambda weights, **kw: calls.append(("clip", weights, kw)) or "C"
    )
    loaded = nets.load_metric_nets(
        "auto", image_shape=(3, 256, 256), inception_weights="i.pth", clip_weights="c.bin", random_init=True
    )
    assert loaded == nets.MetricNets("I", "C", "inception-v3", "clip-vit-l-14")
    assert calls == [
        ("inception", "i.pth", {"random_init": True, "device": "cpu"}),
        ("clip", "c.bin", {"random_init": True, "device": "cpu"}),
    ]
    assert nets.load_metric_nets("inception").classifier_name == "inception-v3"
    assert nets.load_metric_nets().classifier_name == "inception-v3"  # no shape: full size


def test_metric_nets_unknown_kind():
    with pytest.raises(ValueError, match=r"'fid'.*valid choices.*'auto'.*'digits'.*'inception'"):
        nets.load_metric_nets("fid")
