"""fldd.service without any server: request checks, seeds inside batches, clamping, formats, and
no shared model state touched per request."""

import base64
import io

import pytest
import torch
from PIL import Image

from fldd.codec import TokenCodec
from fldd.config import CONFIG_DIR, FLDDConfig
from fldd.model import FLDDModel
from fldd.sampler import sample
from fldd.service import GenerationRequest, Limits, RequestError, SamplerService, png_base64
from tests.conftest import tiny_config, tiny_model


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
    ({"format": "rows"}, "format", "table models"),
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
    cfg = FLDDConfig.from_yaml(CONFIG_DIR / "text.yaml").with_overrides(  # a model from before codecs: none saved
        {"seq_len": 64, "vocab_size": 27, "process.method": "masked", "process.num_steps": 2,
         "reverse_network.arch": "mlp", "reverse_network.width": 16, "forward_network.arch": "mlp",
         "forward_network.width": 16})
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
    image = Image.open(io.BytesIO(raw))
    assert (image.format, image.mode, image.size) == ("PNG", "L", (4, 4))
    assert list(image.tobytes()) == [0, 85, 170, 255] * 4  # token k of K=4 -> 255 k / 3, row by row


def test_limits_from_config():
    assert Limits.from_dict({"max_num_samples": 8}).max_num_samples == 8
    with pytest.raises(ValueError, match="unknown keys"):
        Limits.from_dict({"max_samples": 8})
    with pytest.raises(ValueError, match="max_batch_rows"):
        Limits.from_dict({"max_num_samples": 100, "max_batch_rows": 10})
    with pytest.raises(ValueError, match="limits.max_num_samples"):
        Limits.from_dict({"max_num_samples": 0})


def codec_service(codec: TokenCodec, *, K: int, D: int, method: str = "masked") -> SamplerService:
    torch.manual_seed(0)
    return SamplerService(FLDDModel(tiny_config({"process.method": method}, T=2, K=K, D=D), codec=codec))


def test_chars_codec_decodes_text_and_encodes_the_prefix():
    alphabet = "\n abcdeé."
    service = codec_service(TokenCodec("chars", alphabet), K=len(alphabet), D=12)
    assert service.formats == ("tokens", "text")
    prepared, tokens = service(GenerationRequest(num_samples=3, seed=1, prefix="é\nab", format="text"))
    assert prepared.condition[:4].tolist() == [alphabet.index(ch) for ch in "é\nab"]
    texts = service.render(tokens, "text")
    assert texts == ["".join(alphabet[t] for t in row) for row in tokens.tolist()]
    assert all(text.startswith("é\nab") and len(text) == 12 for text in texts)
    with pytest.raises(RequestError, match="'Zx' are outside the alphabet") as caught:
        service.prepare(GenerationRequest(prefix="axZ"))
    assert caught.value.field == "prefix"
    with pytest.raises(RequestError, match="12 characters: longer than"):
        service.prepare(GenerationRequest(prefix="a" * 12))


def test_bytes_codec_prefix_counts_bytes():
    service = codec_service(TokenCodec("bytes"), K=256, D=6)
    assert service.formats == ("tokens", "text")
    prepared, tokens = service(GenerationRequest(num_samples=2, seed=0, prefix="é!", format="text"))
    assert prepared.condition[:3].tolist() == list("é!".encode()) and prepared.condition_mask.sum() == 3
    assert all(text.startswith("é!") for text in service.render(tokens, "text"))
    with pytest.raises(RequestError, match="6 bytes: longer than"):
        service.prepare(GenerationRequest(prefix="ééé"))


def test_columns_codec_offers_rows():
    codec = TokenCodec("columns", columns=("size", "colour"), categories=(("L", "M", "S"), ("blue", "red")))
    service = codec_service(codec, K=3, D=2)
    assert service.formats == ("tokens", "rows")
    _, tokens = service(GenerationRequest(num_samples=50, seed=0, format="rows", positions=[1], tokens=[1]))
    rows = service.render(tokens, "rows")
    assert all(row["colour"] == "red" and row["size"] in ("L", "M", "S") for row in rows)
    assert rows == [codec.decode(row) for row in tokens.tolist()]
    assert codec.decode([0, 2]) == {"size": "L", "colour": None}  # an id past the column's categories
    for request, field, message in ((GenerationRequest(format="text"), "format", "text models"),
                                    (GenerationRequest(format="png"), "format", "image data"),
                                    (GenerationRequest(prefix="L"), "prefix", "text models")):
        with pytest.raises(RequestError, match=message) as caught:
            service.prepare(request)
        assert caught.value.field == field


def test_a_codec_that_does_not_fit_the_model_is_ignored():
    service = codec_service(TokenCodec("chars", "abc"), K=4, D=3)  # 3 symbols, vocabulary 4
    assert service.codec is None and service.formats == ("tokens",)
    with pytest.raises(RequestError, match="text models"):
        service.render(torch.zeros(1, 3, dtype=torch.long), "text")
