"""The device setting, the chunked loss, MFU accounting, micro-batching and activation offload (CPU)."""

from __future__ import annotations

import pytest
import torch

from loram_core.align import train_causal_lm
from loram_core.config import AlignConfig, load_config
from loram_core.device import default_dtype, describe, resolve_device
from loram_core.errors import ConfigError
from loram_core.loss import causal_lm_loss, training_flops_per_token
from loram_core.prune.streaming import Activations
from tests.conftest import REPO, tiny_model


def test_auto_is_the_cpu_here_and_cpu_dtypes_are_fp32() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    device = resolve_device("auto")
    assert device == torch.device("cpu")
    assert default_dtype(device) is torch.float32 and default_dtype(device, "bfloat16") is torch.bfloat16
    assert describe(device)["device"] == "cpu"


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "CUDA"])
def test_malformed_device_names_the_forms(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"auto, cpu, cuda, cuda:N"):
        resolve_device(spec)
    with pytest.raises(ConfigError, match="`device`"):
        load_config(REPO / "configs" / "demo.yaml", [f"device={spec}"])


def test_a_gpu_this_machine_lacks_is_refused_with_the_fix() -> None:
    spec = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ConfigError, match="device=auto or device=cpu|pick one of those"):
        resolve_device(spec)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_loss_equals_the_models_loss_and_gradients(chunk: int) -> None:
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(0))
    ref, ours = tiny_model(), tiny_model()
    expected = causal_lm_loss(ref, ids, None)
    expected.backward()
    got = causal_lm_loss(ours, ids, chunk)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(ref.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_training_flops_per_token_counts_linears_and_attention() -> None:
    model = tiny_model()  # 2 layers, hidden 64, 4 heads of 16 (2 KV), MLP 128, vocab 128
    per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * 64 * 128
    linear = 2 * per_layer + 64 * 128  # + lm_head
    assert training_flops_per_token(model, 256) == 6 * linear + 2 * 12 * 64 * 256


def _losses(**overrides) -> list[float]:
    model = tiny_model().train()
    blocks = torch.randint(0, 128, (32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    cfg = AlignConfig(steps=4, batch_size=4, log_every=1, warmup_steps=0, lr=1e-3, **overrides)
    return [loss for _, loss in train_causal_lm(model, blocks, cfg).losses]


def test_micro_batches_accumulate_to_the_same_training() -> None:
    whole = _losses(loss_chunk_tokens=None)
    split = _losses(micro_batch_size=1)
    auto = _losses(micro_batch_size="auto")  # the whole batch on the CPU
    assert split == pytest.approx(whole, abs=1e-5)
    assert auto == pytest.approx(whole, abs=1e-5)


def test_activations_offload_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    import loram_core.prune.streaming as streaming

    batches = [(torch.randn(2, 5, 8), {"k": i}) for i in range(3)]
    monkeypatch.setattr(streaming, "free_memory", lambda _device: 1)  # nothing fits: offload
    acts = Activations(batches, torch.device("cpu"))
    assert acts.offloaded and len(acts) == 3
    acts.run(_Double(), replace=True)
    hidden, kwargs = acts.get(1)
    torch.testing.assert_close(hidden, batches[1][0] * 2)
    assert kwargs == {"k": 1}


class _Double(torch.nn.Module):
    def forward(self, hidden: torch.Tensor, **_kwargs) -> torch.Tensor:
        return hidden * 2
