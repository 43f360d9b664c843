"""fldd.service without any server: request checks, seeds inside batches, clamping, formats, and
no shared model state touched per request."""

import base64
import zlib

import pytest
import torch

from fldd.config import FLDDConfig
from fldd.model import FLDDModel
from fldd.sampler import sample
from fldd.service import GenerationRequest, Limits, RequestError, SamplerService, png_base64
from tests.conftest import tiny_model


def masked_service(**limits) -> SamplerService:
    return SamplerService(tiny_model({"process.method": "masked"}, T=3, K=5, D=6, double=False),
                          Limits(**limits) if limits else None)


def test_batched_draws_equal_draws_alone():
    service = masked_service()
    requests = [GenerationRequest(num_samples=n, seed=s) for n, s in ((3, 7), (1, 8), (5, 7), (2, 9))]
    prepared = [service.prepare(r) for r in requests]
    together = service.generate(prepared)
    for p, batched in zip(prepared, together):
        assert torch.equal(batched, service.generate([p])[0])
    assert not torch.equal(together[0], service.generate([service.prepare(GenerationRequest(3, seed=8))])[0])
    # the service draws exactly what fldd.sampler.sample draws with that seed
    assert torch.equal(together[2], sample(service.model, 5, generator=torch.Generator().manual_seed(7)))


def test_batches_are_split_at_max_batch_rows_without_changing_samples():
    service = masked_service(max_num_samples=4, max_batch_rows=5)
    prepared = [service.prepare(GenerationRequest(num_samples=4, seed=s)) for s in range(4)]
    split = service.generate(prepared)
    assert [tuple(t.shape) for t in split] == [(4, 6)] * 4
    assert all(torch.equal(t, service.generate([p])[0]) for t, p in zip(split, prepared))


def test_clamped_positions_come_back_and_others_vary():
    service = masked_service()
    request = GenerationRequest(num_samples=200, seed=0, positions=[0, 4], tokens=[3, 1])
    _, tokens = service(request)
    assert (tokens[:, 0] == 3).all() and (tokens[:, 4] == 1).all()
    assert tokens[:, 1].unique().numel() > 1 and (tokens < 5).all()


def test_sampling_never_touches_the_model_mode_or_gradients():
    model = tiny_model({"process.method": "masked"}, T=2, double=False).train()
    sample(model, 4, generator=torch.Generator().manual_seed(0))
    assert model.training  # sample() no longer flips a shared model between eval() and train()
    service = SamplerService(model)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    service(GenerationRequest(num_samples=2, seed=1))
    assert not model.training


@pytest.mark.parametrize("request_kwargs, field, message", [
    ({"num_samples": 0}, "num_samples", "[1, 256]"),
    ({"num_samples": 257}, "num_samples", "[1, 256]"),
    ({"num_samples": 2.0}, "num_samples", "integer"),
    ({"seed": -1}, "seed", "[0, "),
    ({"seed": 2**63}, "seed", "[0, "),
    ({"format": "gif"}, "format", "one of"),
    ({"format": "text"}, "format", "text models"),
    ({"format": "png"}, "format", "image data"),
    ({"positions": [1]}, "conditioning.tokens", "together"),
    ({"positions": [1, 2], "tokens": [1]}, "conditioning.tokens", "same length"),
    ({"positions": [6], "tokens": [1]}, "conditioning.positions", "outside [0, 6)"),
    ({"positions": [1, 1], "tokens": [1, 2]}, "conditioning.positions", "repeated"),
    ({"positions": [1], "tokens": [5]}, "conditioning.tokens", "MASK"),
    ({"positions": [1], "tokens": [True]}, "conditioning.tokens", "integers"),
    ({"positions": list(range(6)), "tokens": [0] * 6}, "conditioning", "all 6 positions"),
    ({"prefix": "ab"}, "prefix", "text models"),
])
def test_refusals_name_the_field(request_kwargs, field, message):
    with pytest.raises(RequestError) as caught:
        masked_service().prepare(GenerationRequest(**request_kwargs))
    assert caught.value.field == field and message in caught.value.message


def test_conditioning_needs_a_masking_forward():
    service = SamplerService(tiny_model({"process.method": "uniform"}, T=2, double=False))
    with pytest.raises(RequestError, match="masking forward") as caught:
        service.prepare(GenerationRequest(positions=[0], tokens=[1]))
    assert caught.value.field == "conditioning"


def test_text_prefix_and_format():
    cfg = FLDDConfig.from_yaml("configs/text.yaml").with_overrides(
        {"process.method": "masked", "process.num_steps": 2, "reverse_network.arch": "mlp",
         "reverse_network.width": 16, "forward_network.arch": "mlp", "forward_network.width": 16})
    service = SamplerService(FLDDModel(cfg))
    assert service.formats == ("tokens", "text")
    prepared, tokens = service(GenerationRequest(num_samples=2, seed=0, prefix="hi there", format="text"))
    assert all(text.startswith("hi there") and len(text) == 64 for text in service.render(tokens, "text"))
    for prefix, message in (("Hi", "outside the alphabet"), ("a" * 64, "longer than"), ("", "non-empty")):
        with pytest.raises(RequestError, match=message):
            service.prepare(GenerationRequest(prefix=prefix))


def test_png_holds_the_tokens_as_pixels():
    row = torch.tensor([0, 1, 2, 3] * 4)
    raw = base64.b64decode(png_base64(row, vocab_size=4))
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    pixels = zlib.decompress(raw[41:41 + int.from_bytes(raw[33:37], "big")])
    assert list(pixels) == [0, 0, 85, 170, 255] * 4  # a filter byte, then one row of 4 pixels


def test_limits_from_config():
    assert Limits.from_dict({"max_num_samples": 8}).max_num_samples == 8
    with pytest.raises(ValueError, match="unknown keys"):
        Limits.from_dict({"max_samples": 8})
    with pytest.raises(ValueError, match="max_batch_rows"):
        Limits.from_dict({"max_num_samples": 100, "max_batch_rows": 10})
    with pytest.raises(ValueError, match="limits.max_num_samples"):
        Limits.from_dict({"max_num_samples": 0})
