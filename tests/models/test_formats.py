"""A model loaded from a safetensors state dict with its class (docs/design.md §model-formats) is
the saved model exactly: in eval mode before anything runs through it, so that no batch-norm
statistic moves."""

from __future__ import annotations

import textwrap

import torch
from safetensors.torch import save_file

from mirage.models.formats import ExternalModel, load_model_file

SOURCE = textwrap.dedent("""
    from torch import nn


    class BatchNormNet(nn.Module):
        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Flatten(), nn.Linear(4 * 8 * 8, num_classes))

        def forward(self, x):
            return self.body(x)
""")


def batch_norm_net(tmp_path, monkeypatch):
    """The class in an importable module of its own, and an instance whose running statistics
    are far from their initial 0 and 1."""
    (tmp_path / "bn_models.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from bn_models import BatchNormNet

    torch.manual_seed(0)
    net = BatchNormNet()
    with torch.no_grad():
        net.train()
        for _ in range(5):
            net(3 * torch.rand(32, 1, 8, 8) + 1)
    return net.eval()


def test_a_state_dict_loads_in_eval_mode_with_its_buffers_and_outputs_exactly(
    tmp_path, monkeypatch
):
    original = batch_norm_net(tmp_path, monkeypatch)
    path = tmp_path / "net.safetensors"
    save_file(original.state_dict(), str(path))
    loaded, card = load_model_file(
        "state_dict", path, class_path="bn_models:BatchNormNet", input_shape=(1, 8, 8)
    )
    assert card.num_classes == 10
    assert not any(m.training for m in loaded.modules())
    saved = original.state_dict()
    assert saved.keys() == loaded.inner.state_dict().keys()
    for name, value in loaded.inner.state_dict().items():
        assert torch.equal(value, saved[name]), (
            name
        )  # running_mean, running_var, num_batches_tracked
    batch = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(batch), original(batch))


def test_probing_the_number_of_classes_moves_no_statistic_and_keeps_the_mode(tmp_path, monkeypatch):
    net = batch_norm_net(tmp_path, monkeypatch).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = ExternalModel(net, (1, 8, 8))
    assert model.num_classes == 10 and net.training and all(m.training for m in net.modules())
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_static_batch_export_answers_any_batch(tmp_path):
    """``torch.export.export(model, (torch.zeros(1, …),))`` fixes the batch at 1 (its default,
    what a thief exports); the loaded model answers any batch in chunks of it, exactly."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 10),
    ).eval()
    for batch in (1, 3):
        path = tmp_path / f"static-{batch}.pt2"
        torch.export.save(torch.export.export(net, (torch.zeros(batch, 1, 8, 8),)), str(path))
        loaded, card = load_model_file("export", path)
        assert loaded.batch == batch and card.input_shape == (1, 8, 8) and loaded.num_classes == 10
        x = torch.rand(7, 1, 8, 8)
        with torch.no_grad():
            assert torch.allclose(loaded(x), net(x), atol=1e-6)
