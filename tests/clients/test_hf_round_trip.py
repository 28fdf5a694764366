"""Hugging Face's model surgery on a tethered model: `tie_weights()` and
`resize_token_embeddings()` inside `without_tethers`, `save_pretrained` through `untether`; ties
stay tied, tethers keep their state, the optimizer keeps its parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tetherfed import get_tether, tether, tethered_layers, untether, without_tethers

pytestmark = pytest.mark.torch
transformers = pytest.importorskip("transformers")

VOCAB = 100


def gpt2(mode: str = "learned") -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=VOCAB, eos_token_id=0
    )
    torch.manual_seed(0)
    return tether(transformers.GPT2LMHeadModel(config).eval(), mode)


def raw(module: nn.Module) -> nn.Parameter:
    return module.parametrizations.weight.original  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", ["static", "learned", "importance"])
def test_resize_and_tie_keep_the_tie_the_tethers_and_the_optimizers_parameters(mode: str) -> None:
    model = gpt2(mode)
    wte, head = model.transformer.wte, model.lm_head
    optimizer_params = {id(p) for p in model.parameters()}
    tethers = {name: tp.current().detach().clone() for name, tp in tethered_layers(model).items()}
    with without_tethers(model):
        assert not tethered_layers(model)  # plain parameters inside
        assert isinstance(model.transformer.h[0].attn.c_attn.weight, nn.Parameter)
        model.tie_weights()
        model.resize_token_embeddings(VOCAB + 20)
    wte, head = model.transformer.wte, model.lm_head
    assert raw(head) is raw(wte), "the embedding and the head share one weight"
    assert head.parametrizations.weight[0] is wte.parametrizations.weight[0], "and one tether"
    after = tethered_layers(model)
    assert after.keys() == tethers.keys()
    for name, old in tethers.items():
        new = after[name].current().detach()
        if name == "transformer.wte":  # resized: old rows kept, new rows T = 1
            assert new.shape == (VOCAB + 20, 32)
            torch.testing.assert_close(new[:VOCAB], old, rtol=0, atol=1e-6)
            assert bool((new[VOCAB:] >= 1 - 1e-4).all())  # learned: T's logit is clamped
        else:  # untouched: the same values, the same raw parameter the optimizer holds
            torch.testing.assert_close(new, old, rtol=0, atol=0)
    kept = [raw(m) for m in (model.transformer.h[0].attn.c_attn, model.transformer.h[1].mlp.c_fc)]
    assert all(id(p) in optimizer_params for p in kept)
    ids = torch.randint(0, VOCAB + 20, (2, 8))
    assert model(ids).logits.shape == (2, 8, VOCAB + 20)
    effective = raw(wte) * get_tether(wte)
    torch.testing.assert_close(wte.weight, effective)


def test_untether_exports_what_the_tethered_model_computes(tmp_path: Path) -> None:
    model = gpt2()
    with pytest.raises(RuntimeError, match="shared tensors"):  # why the export goes by untether
        model.save_pretrained(tmp_path / "direct")
    untether(model).save_pretrained(tmp_path / "export")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = torch.randint(0, VOCAB, (2, 8))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_tether_stacked_with_weight_norm_is_refused_and_nothing_changes() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    tether(model, "static")
    before = {name: tp.current().clone() for name, tp in tethered_layers(model).items()}
    refused = pytest.raises(ValueError, match=r"layer '0'.*stacked with another parametrization")
    with refused, without_tethers(model):
        pytest.fail("the block must not run")
    after = tethered_layers(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n].current(), v) for n, v in before.items())


def test_a_tethered_weight_removed_in_the_block_is_named() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    tether(model, "static")
    gone = pytest.raises(RuntimeError, match=r"gone after without_tethers\(\): \['1'\]")
    with gone, without_tethers(model):
        del model[1]
    assert list(tethered_layers(model)) == ["0"]
