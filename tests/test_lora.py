"""Our LoRA layer against a naive plain-torch LoRA over the weight bitsandbytes dequantizes."""

import math

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from torch import nn

from qlora_kit.errors import UserError
from qlora_kit.fused import draw_dropped, zero_dropped
from qlora_kit.lora import LoRALinear, add_lora, is_lora, select_targets


def quantized_linear(d_in: int, d_out: int, bias: bool, quant_type: str = "nf4") -> bnb.nn.Linear4bit:
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(d_in, d_out, bias=bias, compute_dtype=torch.float32, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(torch.randn(d_out, d_in) * 0.05, requires_grad=False, quant_type=quant_type,
                                     compress_statistics=True, blocksize=64).to("cpu")
    if bias:
        layer.bias = nn.Parameter(torch.randn(d_out), requires_grad=False)
    return layer


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 agreement up to summation order: 1e-5 of the tensor's largest magnitude."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def check_against_naive(lora: LoRALinear, x: torch.Tensor, y: torch.Tensor, kept=None, keep_scale=1.0) -> None:
    """`y = lora(x)` against x W^T + b + scale * (kept(x) A^T) B^T in plain torch over bitsandbytes' own
    dequantized W: outputs and the gradients of A, B and x."""
    base = lora.base_layer
    W = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state)
    A = lora.lora_A.weight.detach().clone().requires_grad_()
    B = lora.lora_B.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    x_in = x_ref if kept is None else x_ref * kept * keep_scale
    y_ref = x_ref @ W.T + (base.bias if base.bias is not None else 0) + lora.scale * (x_in @ A.T) @ B.T
    close(y, y_ref)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    y_ref.backward(grad_out)
    close(lora.lora_A.weight.grad, A.grad)
    close(lora.lora_B.weight.grad, B.grad)
    close(x.grad, x_ref.grad)
    assert base.weight.grad is None


@pytest.mark.parametrize("quant_type, bias, rslora", [("nf4", False, False), ("fp4", True, True)])
def test_forward_and_backward_match_naive_lora(quant_type, bias, rslora):
    base = quantized_linear(128, 96, bias, quant_type)
    lora = LoRALinear(base, r=8, alpha=16, dropout=0.0, use_rslora=rslora)
    assert lora.scale == (16 / math.sqrt(8) if rslora else 16 / 8)
    nn.init.normal_(lora.lora_B.weight)  # B starts at zero; make the update non-trivial
    x = torch.randn(3, 5, 128, requires_grad=True)
    check_against_naive(lora, x, lora(x))


@pytest.mark.parametrize("p", [0.1, 0.5])  # 0.1: geometric gaps on the CPU; 0.5: a uniform draw per entry
def test_dropout_matches_naive_lora_with_the_same_mask(p):
    base = quantized_linear(128, 96, bias=True)
    lora = LoRALinear(base, r=8, alpha=16, dropout=p).train()
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(3, 5, 128, requires_grad=True)
    torch.manual_seed(7)
    dropped = zero_dropped(torch.ones(15, 128), draw_dropped(torch.Size((15, 128)), p, x.device)) == 0
    assert 0.25 * p < dropped.float().mean() < 2 * p
    torch.manual_seed(7)  # the layer draws the same mask
    check_against_naive(lora, x, lora(x), kept=~dropped.view(3, 5, 128), keep_scale=1 / (1 - p))  # inverted dropout


@pytest.mark.parametrize("per_round", [None, 7])  # 7: many rounds of gaps, to test the continuation
@pytest.mark.slow
def test_dropout_draws_are_bernoulli(per_round):
    """Indices sorted, unique, in range; rate p; neighbours independent (pairs dropped together at rate p^2)."""
    p, shape = 0.05, torch.Size((400, 500))
    torch.manual_seed(0)
    dropped = [draw_dropped(shape, p, torch.device("cpu"), per_round) for _ in range(20)]
    for d in dropped:
        assert d.dtype == torch.int64 and bool((d[1:] > d[:-1]).all()) and 0 <= d[0] and d[-1] < shape.numel()
    masks = torch.stack([torch.zeros(shape.numel(), dtype=torch.bool).index_fill_(0, d, True) for d in dropped])
    n = masks.numel()
    rate = masks.float().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n), rate
    pairs = (masks[:, 1:] & masks[:, :-1]).float().mean().item()
    assert abs(pairs - p * p) < 5 * math.sqrt(p * p / n), pairs
    assert not torch.equal(masks[0], masks[1])


def test_init_is_kaiming_A_zero_B_and_changes_nothing():
    base = quantized_linear(64, 64, bias=True)
    lora = LoRALinear(base, r=4, alpha=8)
    assert torch.count_nonzero(lora.lora_B.weight) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) bound for fan_in 64
    assert lora.lora_A.weight.abs().max() <= bound and lora.lora_A.weight.std() > bound / 3
    x = torch.randn(2, 64)
    assert torch.equal(lora(x), base(x))


def test_dropout_applies_to_the_lora_path_only():
    base = quantized_linear(64, 64, bias=False)
    lora = LoRALinear(base, r=4, alpha=8, dropout=0.5).train()
    x = torch.randn(4, 64)
    assert torch.equal(lora(x), base(x))  # B == 0: dropout must not touch the base path


def test_add_lora_freezes_everything_but_lora():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    add_lora(model, ["0", "2"], r=2, alpha=4, dropout=0.0, use_rslora=False, dtype=torch.float32)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"}
    assert all(is_lora(n) for n in trainable)


NAMES = [f"model.layers.{i}.{m}" for i in range(2) for m in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")]


def test_select_targets_by_name_and_regex():
    assert select_targets(NAMES, "all-linear") == NAMES
    assert select_targets(NAMES, ["q_proj", "v_proj"]) == [n for n in NAMES if n.endswith(("q_proj", "v_proj"))]
    assert select_targets(NAMES, [r"model\.layers\.1\..*_proj"]) == NAMES[5:]
    assert select_targets(NAMES, ["self_attn.o_proj"]) == [NAMES[3], NAMES[8]]


def test_select_targets_that_match_nothing_list_what_exists():
    with pytest.raises(UserError, match=r"'qproj' matches no linear layer.*down_proj, k_proj, o_proj, q_proj, v_proj"):
        select_targets(NAMES, ["v_proj", "qproj"])


def test_checkpointed_recompute_skips_the_last_base_matmul_and_a_dequantization():
    """In a checkpointed block (gate -> SiLU -> down), the recompute stops at the block's last saved tensor, so
    `down` never redoes its base matmul, and on the CPU the backward reuses the recompute's dequantized weights.
    Counted from the operations torch and bitsandbytes ran; outputs and gradients equal the plain block's."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.checkpoint import checkpoint

    from qlora_kit.fused import checkpoint_contexts

    gate = LoRALinear(quantized_linear(64, 96, bias=True), r=8, alpha=16, dropout=0.1).train()
    down = LoRALinear(quantized_linear(96, 48, bias=False), r=8, alpha=16, dropout=0.1).train()
    for lora in (gate, down):
        nn.init.normal_(lora.lora_B.weight)

    def block(x):
        return down(torch.nn.functional.silu(gate(x)))

    def run(checkpointed: bool, contexts: bool):
        x = torch.randn(20, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(3)  # the same dropout masks in every run
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            kwargs = {"context_fn": checkpoint_contexts} if contexts else {}
            y = checkpoint(block, x, use_reentrant=False, **kwargs) if checkpointed else block(x)
            y.backward(torch.ones_like(y))
        grads = [x.grad] + [p.grad.clone() for p in (*gate.parameters(), *down.parameters()) if p.grad is not None]
        for p in (*gate.parameters(), *down.parameters()):
            p.grad = None
        events = prof.events()
        mm = [e.input_shapes[:2] for e in events if e.name == "aten::mm"]
        counts = {"down base": mm.count([[20, 96], [96, 48]]), "gate base": mm.count([[20, 64], [64, 96]]),
                  "dequantize": sum(e.name == "bitsandbytes::dequantize_4bit" for e in events)}
        return y.detach(), grads, counts

    y_plain, grads_plain, plain = run(checkpointed=False, contexts=False)
    _, _, stock = run(checkpointed=True, contexts=False)
    y_ours, grads_ours, ours = run(checkpointed=True, contexts=True)
    assert plain == {"down base": 1, "gate base": 1, "dequantize": 4}  # forward; the backward dequantizes again
    assert stock == {"down base": 2, "gate base": 2, "dequantize": 6}  # + the recompute
    assert ours == {"down base": 1, "gate base": 2, "dequantize": 4}  # down's recompute stops before its matmul
    close(y_ours, y_plain)
    for actual, expected in zip(grads_ours, grads_plain, strict=True):
        close(actual, expected)


def test_the_gpu_dropout_mask_is_drawn_as_booleans_without_a_float_per_entry(monkeypatch):
    """On GPUs (the CPU runs their path with the CPU speed-ups off) dropout draws a 1-byte mask: no fp32 random
    number per entry, which at 8192 tokens x 14336 would be a 470 MB temporary per LoRA input."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from qlora_kit import cpu

    class Outputs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.dtypes += [t.dtype for t in (out if isinstance(out, (tuple, list)) else [out])
                            if isinstance(t, torch.Tensor) and t.numel() == 64 * 512]
            return out

    monkeypatch.setattr(cpu, "SPEEDUPS", False)
    torch.manual_seed(0)
    with Outputs() as seen:
        mask = draw_dropped(torch.Size((64, 512)), 0.1, torch.device("cpu"))
    assert mask.dtype == torch.bool and seen.dtypes and set(seen.dtypes) == {torch.bool}
    assert abs(mask.float().mean().item() - 0.1) < 0.01
