"""Re-splitting head checkpoints for another world size (1→4, 4→2, 2→3), and refusing mismatches.

The chain (tests/head_reference.py RESUME): a world-size-1 run's state after step k−1, resharded,
is loaded at the world size of step k, which must reproduce step k's loss and post-step state.
"""

from __future__ import annotations

import pytest
import torch

from fr_train.heads import CombinedMargin, PartialFC, class_shard, reshard_head_states
from tests.distributed import run_distributed
from tests.head_reference import RESUME, pack, resume_head, resume_reference, unpack
from tests.test_head_partial_fc import _rank_all, results


def _union(states: list[dict], key: str, opt_key: str | None = None) -> torch.Tensor:
    if opt_key is None:
        return torch.cat([s["rows"][key] for s in states])
    return torch.cat([s["optimizer"]["rows"][key][opt_key] for s in states])


def _assert_same_content(a: list[dict], b: list[dict], exact: bool = True) -> None:
    for key in a[0]["rows"]:
        x, y = _union(a, key), _union(b, key)
        assert torch.equal(x, y) if exact else torch.allclose(x, y, rtol=0, atol=1e-12), key
    for p, entries in a[0]["optimizer"]["rows"].items():
        for k in entries:
            x, y = _union(a, p, k), _union(b, p, k)
            assert torch.equal(x, y) if exact else torch.allclose(x, y, rtol=0, atol=1e-12), (p, k)
    assert {s["iteration"] for s in a} == {s["iteration"] for s in b}


@pytest.mark.parametrize(("src", "dst"), [(1, 4), (4, 2), (2, 3), (3, 1)])
def test_reshard_preserves_the_union_and_follows_the_split_rule(src: int, dst: int) -> None:
    """Shards, VPL bank + timestamps and optimizer rows: same union, new contiguous ranges."""
    _, states = resume_reference()
    written = reshard_head_states([states[2]], src)
    out = reshard_head_states(written, dst)
    _assert_same_content([states[2]], out)
    for r, s in enumerate(out):
        shard = class_shard(RESUME["classes"], dst, r)
        assert (s["world_size"], s["rank"], s["class_start"], s["num_local"]) == (dst, r, shard.class_start, shard.num_local)
        assert s["rows"]["weight"].shape == (shard.num_local, RESUME["dim"])


def test_reshard_keeps_a_softmax_heads_bias_and_its_momentum() -> None:
    head = PartialFC(7, 4, CombinedMargin.softmax(), storage_dtype=torch.float64)
    opt = head.make_optimizer(0.1)
    head(torch.randn(6, 4, dtype=torch.float64), torch.arange(6)).backward()
    opt.step()
    out = reshard_head_states(reshard_head_states([head.state_dict()], 3), 2)
    assert torch.equal(_union(out, "bias"), head.bias.detach())
    assert torch.equal(_union(out, "bias", "momentum_buffer"), opt.state[head.bias]["momentum_buffer"])


@pytest.mark.parametrize("world", [4, 2, 3])
def test_training_resumes_exactly_after_resharding(world: int) -> None:
    """Step k at the new world size (after 1→4, 4→2, 2→3) gives the world-size-1 loss, embedding
    gradient, and post-step shards / momentum / VPL bank."""
    losses, states = resume_reference()
    step = next(k for k, w in RESUME["world_of_step"].items() if w == world)
    if world == 3:
        ranks = [unpack(r)["resume"] for r in run_distributed(_rank_all, 3, _states_for_3(), timeout=300)]
    else:
        ranks = [r["resume"] for r in results(world)]
    assert all(abs(r["loss"] - losses[step - 1]) <= 1e-12 * abs(losses[step - 1]) for r in ranks)
    _assert_same_content([states[step]], [r["state"] for r in ranks], exact=False)


def _states_for_3() -> list[bytes]:
    from tests.head_reference import resume_states_for

    states = resume_states_for(3)
    assert states is not None
    return states


def test_loading_refuses_another_class_count_embedding_size_or_class_range() -> None:
    """A mismatching state is refused with a message naming the field (never silently re-initialised)."""
    _, states = resume_reference()
    state = states[1]
    other_classes = PartialFC(14, 8, CombinedMargin.arcface(), storage_dtype=torch.float64)
    with pytest.raises(ValueError, match="field 'num_classes' is 13, this head has 14"):
        other_classes.load_state_dict(state)
    other_dim = PartialFC(13, 16, CombinedMargin.arcface(), storage_dtype=torch.float64)
    with pytest.raises(ValueError, match="field 'embedding_size' is 8, this head has 16"):
        other_dim.load_state_dict(state)
    head = resume_head()
    head.make_optimizer(**RESUME["optimizer"])
    with pytest.raises(ValueError, match=r"field 'world_size' is 4, this head has 1.*reshard_head_states"):
        head.load_state_dict(reshard_head_states([state], 4)[1])
    no_opt = resume_head()
    with pytest.raises(ValueError, match="make_optimizer"):
        no_opt.load_state_dict(state)
    with pytest.raises(ValueError, match="field 'world_size' is 1 but 2 state"):
        reshard_head_states([state, state], 3)


def test_states_load_with_weights_only_unpickling() -> None:
    """A head state is plain tensors/containers: torch.load(weights_only=True) reads it back."""
    _, states = resume_reference()
    again = unpack(pack(states[3]))
    head = resume_head()
    head.make_optimizer(**RESUME["optimizer"])
    head.load_state_dict(again)
    assert head.iteration == 3
    assert torch.equal(head.vpl_memory, states[3]["rows"]["vpl_memory"])
