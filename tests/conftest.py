import pytest


@pytest.fixture
def offline(monkeypatch):
    """Pretend the Hub is unreachable, the way a reader's HF_HUB_OFFLINE=1 does."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
