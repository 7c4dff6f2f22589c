import pytest
import torch

from lggdeploy.common.errors import ModelError
from lggdeploy.models.networks import build_model, count_parameters
from lggdeploy.models.presets import PRESETS, resolve_model


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_builds_and_keeps_input_resolution(name):
    built = build_model(PRESETS[name], "random")
    model = built.model.eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 1, 64, 64)
    assert built.encoder_weights == "random"


def test_pspnet_drops_the_encoder_stages_it_never_runs():
    import segmentation_models_pytorch as smp

    full = smp.create_model("PSPNet", encoder_name="resnext50_32x4d", encoder_weights=None, classes=1)
    built = build_model(PRESETS["pspnet-scratch"], "random")
    assert built.dropped_modules == ["encoder.layer3", "encoder.layer4"]
    assert count_parameters(full) > 20e6 and count_parameters(built.model) < 3e6
    full.encoder.layer3 = torch.nn.Identity()
    full.encoder.layer4 = torch.nn.Identity()
    full.load_state_dict(built.model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(full.eval()(x), built.model.eval()(x))


def test_custom_arch_encoder_and_unknown_names():
    spec = resolve_model("unet:resnet18")
    assert (spec.arch, spec.encoder, spec.encoder_weights) == ("unet", "resnet18", None)
    with pytest.raises(ModelError, match="unknown model"):
        resolve_model("pspnet-scratchy")
    with pytest.raises(ModelError, match="unknown smp architecture"):
        resolve_model("nosuchnet:resnet18")
    with pytest.raises(ModelError, match="unknown smp encoder"):
        resolve_model("unet:resnet19")


def test_encoder_weights_from_a_local_file(tmp_path):
    import segmentation_models_pytorch as smp

    # A torchvision-style full ResNeXt50 state dict, with classifier head and the stages PSPNet never runs.
    source = smp.encoders.get_encoder("resnext50_32x4d", depth=5)
    state = dict(source.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = tmp_path / "resnext50_imagenet.pth"
    torch.save(state, path)
    built = build_model(PRESETS["pspnet-resnext50"], str(path))
    assert built.encoder_weights == f"file:{path}" and len(built.encoder_weights_sha256) == 64
    loaded = built.model.encoder.state_dict()
    for key in ("conv1.weight", "layer1.0.conv2.weight", "layer2.3.bn3.running_var"):
        assert torch.equal(loaded[key], state[key])


def test_encoder_weights_that_do_not_fit_are_refused(tmp_path):
    import segmentation_models_pytorch as smp

    path = tmp_path / "resnet18.pth"
    torch.save(smp.encoders.get_encoder("resnet18").state_dict(), path)
    with pytest.raises(ModelError, match="resnet18.pth: encoder weights do not"):
        build_model(PRESETS["pspnet-resnext50"], str(path))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ModelError, match="junk.pth: cannot read encoder weights"):
        build_model(PRESETS["pspnet-resnext50"], str(tmp_path / "junk.pth"))
    with pytest.raises(ModelError, match="does not exist"):
        build_model(PRESETS["pspnet-resnext50"], str(tmp_path / "absent.pth"))


def test_offline_imagenet_is_a_clear_error_not_a_random_init(monkeypatch):
    import segmentation_models_pytorch.encoders as encoders
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub (offline)")

    monkeypatch.setattr(encoders, "hf_hub_download", offline)
    with pytest.raises(ModelError, match="--encoder-weights PATH"):
        build_model(PRESETS["unet-effb7"])  # the preset's default is imagenet


def test_offline_hub_loading_fails_at_once_instead_of_retrying(monkeypatch):
    """No network: smp's hub is asked in offline mode (local cache only), so there are no retries to wait for."""
    import segmentation_models_pytorch as smp
    from huggingface_hub import constants

    import lggdeploy.models.networks as networks

    seen = []
    real = smp.create_model

    def create(*args, **kwargs):
        seen.append((kwargs.get("encoder_weights"), constants.HF_HUB_OFFLINE))
        if kwargs.get("encoder_weights"):
            raise OSError("not in the local cache")
        return real(*args, **kwargs)

    monkeypatch.setattr(networks, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(smp, "create_model", create)
    before = constants.HF_HUB_OFFLINE
    with pytest.raises(ModelError, match="--encoder-weights PATH"):
        build_model(PRESETS["pspnet-resnext50"])
    assert seen == [("imagenet", True)] and constants.HF_HUB_OFFLINE == before
