"""beit.models.tokenizer (the dVAE tokenizer model) and beit.tokenizers.dalle (safe DALL-E conversion).

The reference is the ``dall_e`` package (installed as a dev dependency): its own Encoder/Decoder with
random weights, pickled whole with ``torch.save`` as OpenAI's ``encoder.pkl``/``decoder.pkl`` are.
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from beit.config import ConfigError, replace
from beit.loading import is_tokenizer_file, load_tokenizer
from beit.models.tokenizer import (
    TOKENIZER_PRESETS,
    Tokenizer,
    get_tokenizer_preset,
    map_pixels,
    save_tokenizer,
    unmap_pixels,
)
from beit.models.tokenizer import TokenizerConfig as DVAEConfig
from beit.tokenizers.dalle import ConversionError, convert_dalle

TINY = DVAEConfig(img_size=16, vocab_size=32, n_hid=8, n_groups=2, n_blk_per_group=1, n_init=8)


@pytest.mark.parametrize("name", sorted(TOKENIZER_PRESETS))
def test_presets_shapes(name):
    cfg = get_tokenizer_preset(name)
    tok = Tokenizer(cfg).eval()
    b = 1 if cfg.img_size > 64 else 2  # dalle_112 is big: one image keeps the test fast
    x = torch.rand(b, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        logits = tok.encode_logits(x)
    gh, gw = cfg.grid_size
    assert logits.shape == (b, cfg.vocab_size, gh, gw)
    ids = tok.encode(x)
    assert ids.shape == (b, gh, gw) and ids.dtype == torch.long
    assert torch.equal(ids, logits.argmax(1))
    rec = tok.decode(ids)
    assert rec.shape == x.shape and rec.min() >= 0 and rec.max() <= 1


def test_preset_grids():
    assert get_tokenizer_preset("dvae_32").grid_size == (8, 8)
    assert get_tokenizer_preset("dvae_64").grid_size == (8, 8)
    d = get_tokenizer_preset("dalle_112")
    assert d.grid_size == (14, 14) and d.vocab_size == 8192 and d.n_hid == 256 and d.n_blk_per_group == 2
    get_tokenizer_preset("dvae_32").vocab_size = 3  # a copy: the registry is untouched
    assert TOKENIZER_PRESETS["dvae_32"].vocab_size != 3
    with pytest.raises(ConfigError, match="unknown tokenizer preset"):
        get_tokenizer_preset("dvae_33")


def test_config_validation():
    with pytest.raises(ConfigError, match="img_size"):
        DVAEConfig(img_size=30, n_groups=3)
    with pytest.raises(ConfigError, match="n_hid"):
        DVAEConfig(n_hid=30)
    with pytest.raises(ConfigError, match="quantizer"):
        DVAEConfig(quantizer="fsq")


def test_encode_deterministic_batched_and_checks_input():
    torch.manual_seed(0)
    tok = Tokenizer(TINY).eval()
    x = torch.rand(5, 3, 16, 16)
    ids = tok.encode(x)
    assert torch.equal(ids, tok.encode(x))
    assert torch.equal(ids, tok.encode(x, batch_size=2))  # batching changes nothing
    assert torch.equal(tok.encode(x[3:4]), ids[3:4])
    assert torch.allclose(tok.decode(ids, batch_size=2), tok.decode(ids), atol=1e-6)
    with pytest.raises(ValueError, match="16, 16"):
        tok.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        tok.encode(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="float"):
        tok.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="normalised"):
        tok.encode(torch.randn(1, 3, 16, 16) * 3)
    with pytest.raises(ValueError, match="lie in"):
        tok.decode(torch.full((1, 2, 2), 32))
    with pytest.raises(ValueError, match="integer"):
        tok.decode(torch.zeros(1, 2, 2))


def test_decode_lookup_equals_one_hot_conv():
    torch.manual_seed(0)
    for cfg in (TINY, replace(TINY, quantizer="vq", embed_dim=6)):
        tok = Tokenizer(cfg).eval()
        for p in tok.parameters():
            p.data.normal_(std=0.3)
        ids = torch.randint(0, cfg.vocab_size, (3, 4, 4))
        if tok.codebook is None:
            z = F.one_hot(ids, cfg.vocab_size).permute(0, 3, 1, 2).float()
        else:
            z = tok.codebook.embed[ids].permute(0, 3, 1, 2)
        ref = unmap_pixels(torch.sigmoid(tok.decoder(z)[:, :3]))
        torch.testing.assert_close(tok.decode(ids), ref, atol=1e-5, rtol=1e-5)


def test_vq_encode_is_nearest_code():
    torch.manual_seed(0)
    tok = Tokenizer(replace(TINY, quantizer="vq", embed_dim=6)).eval()
    x = torch.rand(2, 3, 16, 16)
    z = tok.encoder(map_pixels(x)).permute(0, 2, 3, 1).reshape(-1, 6)
    ref = torch.cdist(z, tok.codebook.embed).argmin(1).reshape(2, 8, 8)
    assert torch.equal(tok.encode(x), ref)


def test_map_unmap():
    x = torch.rand(2, 3, 4, 4)
    m = map_pixels(x)
    assert m.min() >= 0.1 - 1e-6 and m.max() <= 0.9 + 1e-6
    torch.testing.assert_close(unmap_pixels(m), x)
    assert unmap_pixels(torch.tensor([[[[0.0, 1.0]]]])).tolist() == [[[[0.0, 1.0]]]]


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    for cfg in (TINY, replace(TINY, quantizer="vq", embed_dim=6)):
        tok = Tokenizer(cfg).eval()
        path = save_tokenizer(tok, tmp_path / cfg.quantizer)
        assert path.name == "tokenizer.safetensors" and is_tokenizer_file(path.parent)
        back = load_tokenizer(path.parent)
        assert back.cfg == cfg
        x = torch.rand(2, 3, 16, 16)
        assert torch.equal(back.encode(x), tok.encode(x))
    assert not is_tokenizer_file(tmp_path / "nothing")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert not is_tokenizer_file(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="not a safetensors"):
        load_tokenizer(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- DALL-E


def _dalle_pair(tmp_path, n_hid=64, n_blk=1, vocab=512, n_init=32):
    dall_e = pytest.importorskip("dall_e")
    torch.manual_seed(0)
    enc = dall_e.Encoder(n_hid=n_hid, n_blk_per_group=n_blk, vocab_size=vocab, requires_grad=False)
    dec = dall_e.Decoder(n_hid=n_hid, n_blk_per_group=n_blk, vocab_size=vocab, n_init=n_init, requires_grad=False)
    for m in (enc, dec):  # their biases start at 0: randomise them so the test sees them
        for name, p in m.named_parameters():
            if name.endswith(".b"):
                p.data.normal_(std=0.1)
    torch.save(enc, tmp_path / "encoder.pkl")  # whole modules, like OpenAI's files
    torch.save(dec, tmp_path / "decoder.pkl")
    return enc, dec


def test_dalle_state_dict_names_map_one_to_one():
    dall_e = pytest.importorskip("dall_e")
    tok = Tokenizer(get_tokenizer_preset("dalle_112"))
    enc, dec = dall_e.Encoder(), dall_e.Decoder()
    assert {k: v.shape for k, v in enc.state_dict().items()} == {
        k: v.shape for k, v in tok.encoder.state_dict().items()
    }
    assert {k: v.shape for k, v in dec.state_dict().items()} == {
        k: v.shape for k, v in tok.decoder.state_dict().items()
    }


def test_convert_dalle_matches_reference(tmp_path):
    from dall_e import map_pixels as ref_map
    from dall_e import unmap_pixels as ref_unmap

    enc, dec = _dalle_pair(tmp_path, n_blk=2)  # 2 blocks per group, as DALL-E
    path = convert_dalle(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl", tmp_path / "out", img_size=48)
    assert path == tmp_path / "out" / "tokenizer.safetensors" and (tmp_path / "out" / "config.yaml").is_file()
    tok = load_tokenizer(tmp_path / "out")
    assert tok.cfg.n_groups == 4 and tok.cfg.vocab_size == 512 and tok.cfg.n_init == 32
    x = torch.rand(3, 3, 48, 48)
    with torch.no_grad():
        ref_logits = enc(ref_map(x))
        ids = tok.encode(x)
        assert torch.equal(ids, ref_logits.argmax(1))
        torch.testing.assert_close(tok.encode_logits(x), ref_logits, atol=1e-5, rtol=1e-5)
        one_hot = F.one_hot(ids, 512).permute(0, 3, 1, 2).float()
        ref_rec = ref_unmap(torch.sigmoid(dec(one_hot)[:, :3]))
    assert (tok.decode(ids) - ref_rec).abs().max() < 1e-4


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + str(_Evil.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_convert_refuses_malicious_pickle(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        evil = tmp_path / f"evil{protocol}.pkl"
        torch.save({"w": _Evil()}, evil, pickle_protocol=protocol)
        with pytest.raises(ConversionError, match="refused to unpickle"):
            convert_dalle(evil, evil, tmp_path / "out")
        # a bare pickle (not torch's zip format) is refused too
        raw = tmp_path / f"raw{protocol}.pkl"
        raw.write_bytes(pickle.dumps(_Evil(), protocol=protocol))
        with pytest.raises(ConversionError):
            convert_dalle(raw, raw, tmp_path / "out")
    assert not _Evil.marker.exists()
    assert not (tmp_path / "out").exists()


def test_convert_rejects_wrong_files(tmp_path):
    _dalle_pair(tmp_path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "dict.pt")
    with pytest.raises(ConversionError, match="not a pickled dall_e"):
        convert_dalle(tmp_path / "dict.pt", tmp_path / "decoder.pkl", tmp_path / "out")
    with pytest.raises(ConversionError, match="not dall_e Encoder"):
        convert_dalle(tmp_path / "decoder.pkl", tmp_path / "encoder.pkl", tmp_path / "out")
    with pytest.raises(ConversionError, match="does not exist"):
        convert_dalle(tmp_path / "nope.pkl", tmp_path / "decoder.pkl", tmp_path / "out")
    (tmp_path / "text.pkl").write_text("hello")
    with pytest.raises(ConversionError):
        convert_dalle(tmp_path / "text.pkl", tmp_path / "decoder.pkl", tmp_path / "out")
