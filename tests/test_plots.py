import torch

from melora_pyro.plots import reliability_diagram


def _fake_predictions(n: int, k: int, temperature: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g) + 2.0 * torch.nn.functional.one_hot(labels, k)
    return torch.softmax(logits / temperature, dim=1), labels


def test_reliability_diagram_writes_png(tmp_path):
    results = {
        "MAP": _fake_predictions(500, 4, temperature=0.3, seed=0),  # over-confident
        "Me-LoRA": _fake_predictions(500, 4, temperature=1.0, seed=1),
    }
    out = tmp_path / "sub" / "reliability.png"
    assert reliability_diagram(results, out, title="test", n_bins=10) == out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024
    assert [p.name for p in out.parent.iterdir()] == ["reliability.png"]  # no temporary file left
