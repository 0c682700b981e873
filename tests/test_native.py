"""The verifier's own CPU kernels (sled_verifier/native.py, csrc/): built on this machine, checked bitwise.

The native product is chosen by the load-time probe at one thread on a CPU with AVX2/FMA; it must be the
linear (to float tolerance), give every row the same bits in any product (any row count, any position, any
output count), and carry a model's rows through both runtimes batch-invariantly. Where the machine cannot
build it the tests say so and skip: the verifier then runs torch's kernels (tests/test_invariance.py).
"""

from __future__ import annotations

import pytest
import torch

from sled_verifier import native
from sled_verifier.invariant import kernels
from sled_verifier.runtime import load_target

pytestmark = pytest.mark.skipif(not native.available(), reason="no native kernels on this machine (no cc or no AVX2/FMA)")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("outputs, features, bias", [(24, 40, True), (130, 576, False), (64, 1536, True), (1, 7, True)])
def test_the_native_product_is_the_linear_and_row_invariant(outputs, features, bias):
    """Output counts inside, at and past a 64-wide panel; an input length no vector divides; with and without
    bias. Every row's bits are the same in products of every size from 1 to 40 rows, starting anywhere, and in
    products past one group of rows (48: the kernel keeps a group's running sums between blocks of inputs)."""
    generator = torch.Generator().manual_seed(outputs)
    weight = torch.randn(outputs, features, generator=generator)
    b = torch.randn(outputs, generator=generator) if bias else None
    x = torch.randn(100, features, generator=generator)
    packed = native.pack(weight)
    assert packed.shape == (-(-outputs // 64), features, 64)
    whole = native.linear(x, packed, b, outputs)
    assert torch.allclose(whole, torch.nn.functional.linear(x, weight, b), atol=1e-4, rtol=1e-4)
    for rows in [*range(1, 41), 47, 48, 49, 53, 96, 99]:
        for start in (0, 1, 100 - rows):
            assert torch.equal(native.linear(x[start : start + rows], packed, b, outputs), whole[start : start + rows]), \
                f"{rows} rows from {start}"


def test_the_native_product_refuses_what_it_cannot_compute():
    with pytest.raises(RuntimeError):
        native.pack(torch.randn(8, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError):
        native.linear(torch.randn(2, 8, dtype=torch.float64), native.pack(torch.randn(8, 8)), None, 8)


@pytest.mark.parametrize("threads", [2, 3])
def test_the_threaded_product_gives_the_same_bits_at_any_thread_count(threads, one_thread):
    """Panels are split between threads; an output's arithmetic is its own, so 1, 2 and 3 threads (more than
    this machine may have) give the same bits, for outputs in fewer panels than threads too."""
    generator = torch.Generator().manual_seed(threads)
    for outputs in (64 * 7 + 5, 64, 3072):
        weight, x = torch.randn(outputs, 576, generator=generator), torch.randn(9, 576, generator=generator)
        packed = native.pack(weight)
        alone = native.linear(x, packed, None, outputs)
        torch.set_num_threads(threads)
        together = [native.linear(x[:rows], packed, None, outputs) for rows in (9, 1, 5)]
        torch.set_num_threads(1)
        assert all(torch.equal(t, alone[: t.shape[0]]) for t in together)
    assert kernels(torch.device("cpu"))[0] == "native"


@pytest.mark.parametrize("runtime", ["transformers", "compiled"])
def test_a_model_served_through_it_is_batch_invariant(tiny_models, runtime, one_thread):
    """Both runtimes at one thread take the native product for every shape, and a row's logits are bitwise
    the same alone and in random batches (the check of tests/test_invariance.py)."""
    from tests.test_invariance import alone_and_batched

    target = load_target(tiny_models.target, runtime, "cpu")
    assert target.batch_invariance == "native", target.batch_invariance
    for seed in range(2):
        for session, alone, batched in alone_and_batched(target, seed):
            assert torch.equal(alone, batched), f"seed {seed} session {session}"


def test_torch_inline_keeps_the_kernels_threads_and_gives_torch_its_own_back():
    """Inside ``torch_inline`` torch's operators run on one thread and the kernels on the count torch had; it
    nests, and torch's count comes back after, an exception included."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(KeyError), native.torch_inline():
            assert (torch.get_num_threads(), native.threads()) == (1, 2)
            with native.torch_inline():
                assert (torch.get_num_threads(), native.threads()) == (1, 2)
            assert (torch.get_num_threads(), native.threads()) == (1, 2)
            raise KeyError
        assert (torch.get_num_threads(), native.threads()) == (2, 2)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("runtime", ["transformers", "compiled"])
def test_a_forward_on_two_threads_gives_the_bits_of_one(tiny_models, runtime, one_thread):
    """A forward whose products and attention are native runs torch's operators inline and the kernels on two
    threads: a row's logits are bitwise those of one thread, and torch's thread count is its own again after."""
    from tests.test_invariance import rounds

    target = load_target(tiny_models.target, runtime, "cpu")
    assert target.native_forward
    _, slots, starts, inputs = rounds(target, 0)
    alone = target.forward_rows(slots, starts, inputs)
    torch.set_num_threads(2)
    assert torch.equal(target.forward_rows(slots, starts, inputs), alone)
    assert torch.get_num_threads() == 2


def test_the_per_token_kernels_are_torchs_operators_to_float_rounding():
    """RMS norm, SiLU(gate) x up and the rotary embedding with its KV write (``sled_verifier.tokenwise``) against
    transformers' own modules, on shapes with tails no vector divides; each token's output its own (bitwise the
    same computed alone)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    from sled_verifier import tokenwise

    generator = torch.Generator().manual_seed(5)
    norm = LlamaRMSNorm(100, eps=1e-6)
    norm.weight.data = torch.randn(100, generator=generator)
    x = torch.randn(3, 7, 100, generator=generator) * 3
    normed = tokenwise.rmsnorm(x, norm)
    assert torch.allclose(normed, norm(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(tokenwise.rmsnorm(x[1:2, 3:4], norm), normed[1:2, 3:4])
    gate_up = torch.randn(2, 5, 2 * 37, generator=generator) * 6
    gate_up[0, 0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # far tails of the exponential
    expected = torch.nn.functional.silu(gate_up[..., :37]) * gate_up[..., 37:]
    assert torch.allclose(tokenwise.silu_mul(gate_up), expected, rtol=1e-5, atol=1e-6)
    heads, kv_heads, dim, batch, m = 4, 2, 16, 2, 3
    qkv = torch.randn(batch, m, (heads + 2 * kv_heads) * dim, generator=generator)
    angles = torch.randn(batch, m, dim // 2, generator=generator).repeat(1, 1, 2)
    cos, sin = angles.cos(), angles.sin()
    keys, values = torch.zeros(4, kv_heads, 10, dim), torch.zeros(4, kv_heads, 10, dim)
    slots, positions = torch.tensor([[1, 1, 1], [2, 2, 3]]), torch.tensor([[4, 5, 6], [0, 1, 0]])
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q_ref, k_ref = apply_rotary_pos_emb(q.view(batch, m, heads, dim).transpose(1, 2),
                                        k.view(batch, m, kv_heads, dim).transpose(1, 2), cos, sin)
    out = qkv.clone()
    tokenwise.rope_write(*out.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1), cos, sin, keys, values,
                         slots, positions)
    assert torch.equal(out[..., : heads * dim].view(batch, m, heads, dim).transpose(1, 2), q_ref)
    for b in range(batch):
        for t in range(m):
            assert torch.equal(keys[slots[b, t], :, positions[b, t]], k_ref[b, :, t])
            assert torch.equal(values[slots[b, t], :, positions[b, t]], v.view(batch, m, kv_heads, dim)[b, t])
    apart = [t.clone() for t in (q, k, v)]  # three products' outputs (the transformers runtime's)
    keys_apart, values_apart = torch.zeros_like(keys), torch.zeros_like(values)
    tokenwise.rope_write(*apart, cos, sin, keys_apart, values_apart, slots, positions)
    assert torch.equal(apart[0], out[..., : heads * dim]) and torch.equal(keys_apart, keys)
    assert torch.equal(values_apart, values)


def test_the_transformers_runtime_routes_the_llama_familys_norms_and_mlp(tiny_models):
    """Its RMS norms and SiLU-gated MLPs run the native calls (the products stay the modules' linears), and its
    logits stay the plain torch model's to float rounding."""
    from sled_verifier import tokenwise
    from tests.test_runtime import CONTEXTS, ROUNDS, scores

    target = load_target(tiny_models.target, "transformers", "cpu")
    routed = [m for m in target.model.modules() if type(m).__name__ in (*tokenwise.NORMS, *tokenwise.MLPS)]
    assert routed and all("forward" in vars(m) for m in routed)
    plain = load_target(tiny_models.target, "transformers", "cpu")
    for module in plain.model.modules():
        if type(module).__name__ in (*tokenwise.NORMS, *tokenwise.MLPS):
            del module.forward  # the class's own forward: torch's operators
    ours, theirs = scores(target, CONTEXTS, ROUNDS), scores(plain, CONTEXTS, ROUNDS)
    for row, tokens in enumerate(ROUNDS):
        assert torch.allclose(ours[row, : len(tokens)], theirs[row, : len(tokens)], atol=1e-4, rtol=0)


def test_the_transformers_runtimes_native_rotary_and_kv_write_give_its_own_bits(tiny_models, one_thread):
    """With slot attention its attention modules rotate q and k and write the KV store in one native call
    (``tokenwise.attention_forward``): the logits are bitwise those of transformers' own attention forward."""
    from sled_verifier import tokenwise
    from tests.test_runtime import CONTEXTS, ROUNDS, scores

    target = load_target(tiny_models.target, "transformers", "cpu")
    assert target.attention == "slots"
    routed = [m for m in target.model.modules() if type(m).__name__ in tokenwise.ATTENTIONS]
    assert routed and all("forward" in vars(m) for m in routed)
    plain = load_target(tiny_models.target, "transformers", "cpu")
    for module in plain.model.modules():
        if type(module).__name__ in tokenwise.ATTENTIONS:
            del module.forward
    assert torch.equal(scores(target, CONTEXTS, ROUNDS), scores(plain, CONTEXTS, ROUNDS))


def test_a_forked_child_starts_its_own_workers():
    """A child forked after the pool started has none of its workers: its threaded products must still finish
    (with the same bits), not wait forever for workers that are not there."""
    import os
    import signal

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        weight, x = torch.randn(640, 64), torch.randn(3, 64)
        packed = native.pack(weight)
        parent = native.linear(x, packed, None, 640)  # starts the pool
        child = os.fork()
        if child == 0:
            signal.alarm(60)  # a hang kills the child: the test fails instead of waiting forever
            os._exit(0 if torch.equal(native.linear(x, packed, None, 640), parent) else 3)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        torch.set_num_threads(before)


def test_the_avx2_build_computes_the_same_things(tmp_path, monkeypatch, one_thread):
    """CPUs without AVX-512 get the AVX2+FMA build: compiled here for AVX2 alone and served through the same
    wrappers (product at 1 and 2 threads, per-token calls, attention), checked against torch and for row
    invariance, so that path is not only compiled on the machines that take it."""
    import ctypes
    import subprocess

    from sled_verifier import tokenwise
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    if not {"avx2", "fma"} <= set(native.cpu_flags().split()):
        pytest.skip("this CPU cannot run AVX2 code")
    library = tmp_path / "kernels-avx2.so"
    flags = [f for f in native.FLAGS if f != "-march=native"] + ["-mavx2", "-mfma", "-mno-avx512f"]
    subprocess.run([native.compiler(), *flags, "-o", str(library), *map(str, sorted(native.SOURCES.glob("*.c")))],
                   check=True, capture_output=True)
    monkeypatch.setattr(native, "library", lambda: ctypes.CDLL(str(library)))
    native.function.cache_clear()
    try:
        generator = torch.Generator().manual_seed(8)
        weight, bias = torch.randn(130, 100, generator=generator), torch.randn(130, generator=generator)
        x = torch.randn(60, 100, generator=generator)  # past 48 rows: both of the product's loops
        packed = native.pack(weight)
        whole = native.linear(x, packed, bias, 130)
        assert torch.allclose(whole, torch.nn.functional.linear(x, weight, bias), atol=1e-4)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert all(torch.equal(native.linear(x[i : i + n], packed, bias, 130), whole[i : i + n])
                       for n in (1, 2, 5, 48, 49) for i in (0, 3))
        gate_up = torch.randn(3, 74, generator=generator) * 6
        assert torch.allclose(tokenwise.silu_mul(gate_up), torch.nn.functional.silu(gate_up[:, :37]) * gate_up[:, 37:],
                              rtol=1e-5, atol=1e-6)
        norm = LlamaRMSNorm(100, eps=1e-6)
        assert torch.allclose(tokenwise.rmsnorm(x, norm), norm(x), rtol=1e-5, atol=1e-5)
        heads, kv_heads, dim, length = 4, 2, 32, 40
        keys, values = torch.randn(3, kv_heads, length, dim, generator=generator), \
            torch.randn(3, kv_heads, length, dim, generator=generator)
        query = torch.randn(1, heads, 6, dim, generator=generator)
        out = native.attend(query, keys, values, torch.tensor([[1, 30, 6]]), 36, dim ** -0.5)    # [1, 6, H, D]
        visible = torch.arange(36)[None, :] <= (30 + torch.arange(6))[:, None]
        expected = torch.nn.functional.scaled_dot_product_attention(
            query, keys[1:2, :, :36], values[1:2, :, :36], attn_mask=visible, enable_gqa=True)
        assert torch.allclose(out.transpose(1, 2), expected, atol=1e-5)
        alone = native.attend(query[:, :, 2:3].contiguous(), keys, values, torch.tensor([[1, 32, 1]]), 33, dim ** -0.5)
        assert torch.equal(alone[0, 0], out[0, 2])
    finally:
        native.function.cache_clear()


BF16 = pytest.mark.skipif(native.bf16_products() is None, reason="no bfloat16 product here (AMX or AVX512-BF16)")


def bf16_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What the bfloat16 product computes, in float64: x and the weight rounded to bfloat16, products summed exactly."""
    out = x.to(torch.bfloat16).double() @ weight.to(torch.bfloat16).double().T
    return (out + bias.double() if bias is not None else out).float()


@BF16
@pytest.mark.parametrize("outputs, features, bias", [(24, 40, True), (130, 576, False), (64, 1536, True), (1, 7, True)])
def test_the_bfloat16_product_is_the_rounded_linear_and_row_invariant(outputs, features, bias):
    """bfloat16 weights (``--dtype bfloat16`` on a CPU): the product of x and the weight each rounded to bfloat16,
    summed in float32 (to float32 rounding of the float64 sum), and every row's bits the same in products of 1 to
    40 rows starting anywhere and past 48 (AVX512-BF16's blocks, then whole panels): AMX's 16-row tiles and
    AVX512-BF16's 6-row ones alike."""
    generator = torch.Generator().manual_seed(outputs)
    weight = torch.randn(outputs, features, generator=generator)
    b = torch.randn(outputs, generator=generator) if bias else None
    x = torch.randn(100, features, generator=generator)
    packed = native.pack(weight, torch.bfloat16)
    assert packed.dtype == torch.bfloat16 and packed.shape == (-(-outputs // 64), -(-features // 32) * 16, 64, 2)
    whole = native.linear(x, packed, b, outputs)
    reference = bf16_linear_reference(x, weight, b)
    assert torch.allclose(whole, reference, atol=2e-5 * features ** 0.5, rtol=1e-5)
    assert not torch.allclose(whole, torch.nn.functional.linear(x, weight, b), atol=1e-5, rtol=1e-6)  # it is bfloat16
    for rows in [*range(1, 41), 47, 48, 49, 53, 96, 99]:
        for start in (0, 1, 100 - rows):
            assert torch.equal(native.linear(x[start : start + rows], packed, b, outputs), whole[start : start + rows]), \
                f"{rows} rows from {start}"
    with pytest.raises(RuntimeError):
        native.linear(torch.randn(2, features + 32), packed, b, outputs)  # inputs the packed weight does not take


@BF16
@pytest.mark.parametrize("threads", [2, 3])
def test_the_bfloat16_product_gives_the_same_bits_at_any_thread_count(threads, one_thread):
    generator = torch.Generator().manual_seed(threads)
    for outputs in (64 * 7 + 5, 3072):
        weight, x = torch.randn(outputs, 576, generator=generator), torch.randn(21, 576, generator=generator)
        packed = native.pack(weight, torch.bfloat16)
        alone = native.linear(x, packed, None, outputs)
        torch.set_num_threads(threads)
        together = [native.linear(x[:rows], packed, None, outputs) for rows in (21, 1, 17)]
        torch.set_num_threads(1)
        assert all(torch.equal(t, alone[: t.shape[0]]) for t in together)


@BF16
def test_the_avx512_bf16_path_computes_the_same_product_where_amx_serves(tmp_path):
    """On a CPU with AMX the AVX512-BF16 path (AMD Zen 4's) is what ``SLED_AMX=0`` runs: checked in a child
    process (the choice is made once a process) against the same reference and for row invariance."""
    if native.bf16_products() != "amx":
        pytest.skip(f"this CPU's bfloat16 product is {native.bf16_products()}, checked above")
    script = (
        "import torch\nfrom sled_verifier import native\nfrom tests.test_native import bf16_linear_reference\n"
        "assert native.bf16_products() == 'avx512-bf16', native.bf16_products()\n"
        "g = torch.Generator().manual_seed(0)\nw, b, x = torch.randn(130, 576, generator=g), torch.randn(130, generator=g), "
        "torch.randn(13, 576, generator=g)\np = native.pack(w, torch.bfloat16)\ny = native.linear(x, p, b, 130)\n"
        "assert torch.allclose(y, bf16_linear_reference(x, w, b), atol=5e-4, rtol=1e-5)\n"
        "assert all(torch.equal(native.linear(x[s:s + n], p, b, 130), y[s:s + n]) for n in (1, 5, 6, 7) for s in (0, 3))\n"
        "print('ok')\n")
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root,
                          env={**os.environ, "SLED_AMX": "0", "PYTHONPATH": str(root)})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@BF16
@pytest.mark.parametrize("runtime", ["transformers", "compiled"])
def test_a_bfloat16_target_packs_its_products_and_stays_batch_invariant(tiny_models, runtime, one_thread):
    """``dtype="bfloat16"`` on this CPU: the model is float32 but for its products' weights, packed in bfloat16
    (half the bytes: no float32 copy is kept but a tied embedding's), rows are bitwise the same alone and in
    batches, and the logits are the float32 model's to bfloat16 rounding."""
    from tests.test_invariance import alone_and_batched, rounds

    target = load_target(tiny_models.target, runtime, "cpu", "bfloat16")
    assert target.weights == torch.bfloat16 and target.batch_invariance == "native" and target.native_forward
    assert target.model.dtype == torch.float32
    linears = [m for m in target.model.modules() if isinstance(m, torch.nn.Linear)]
    tied = target.model.get_output_embeddings().weight is target.model.get_input_embeddings().weight
    assert all(m.weight.dtype == torch.bfloat16 for m in linears if not (tied and m is target.model.get_output_embeddings()))
    for session, alone, batched in alone_and_batched(target, 0):
        assert torch.equal(alone, batched), f"session {session}"
    full = load_target(tiny_models.target, runtime, "cpu", "float32")
    _, slots, starts, inputs = rounds(target, 1)
    _, slots32, starts32, inputs32 = rounds(full, 1)
    a, b = target.forward_rows(slots, starts, inputs), full.forward_rows(slots32, starts32, inputs32)
    print(f"bfloat16 against float32 logits: mean |diff| {(a - b).abs().mean():.4f}, logits' std {b.std():.3f}, "
          f"argmax agreement {(a.argmax(-1) == b.argmax(-1)).float().mean():.3f}")
    assert not torch.equal(a, b) and (a - b).abs().mean() < 0.05 * b.std()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_the_native_argmax_is_torchs():
    """Random rows of SmolLM2's vocabulary and odd widths, ties (the first wins), infinities and NaNs (the first
    NaN wins), an all -inf row, signed zeros: ``argmax_rows`` is ``torch.argmax``, index for index."""
    generator = torch.Generator().manual_seed(0)
    for rows, width in ((189, 49152), (3, 7), (5, 16), (4, 17), (2, 33), (1, 1), (7, 1000)):
        x = torch.randn(rows, width, generator=generator)
        assert torch.equal(native.argmax_rows(x), x.argmax(dim=-1)), (rows, width)
    x = torch.zeros(7, 100)
    x[1, 50] = x[1, 70] = 1.0
    x[2, 40] = x[2, 90] = float("nan")
    x[3] = float("-inf")
    x[4, 99], x[4, 3] = float("inf"), float("nan")
    x[5, 0] = float("nan")
    x[6, 17], x[6, 60] = -0.0, 0.0
    assert torch.equal(native.argmax_rows(x), x.argmax(dim=-1))
    coarse = torch.randint(-3, 3, (50, 1000), generator=generator).float()  # many ties in every row
    assert torch.equal(native.argmax_rows(coarse), coarse.argmax(dim=-1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_transformers_runtime_fuses_qkv_and_gate_up_to_the_same_bits(tiny_models, dtype, one_thread):
    """Where its products are native, the transformers runtime runs a layer's q/k/v and gate/up as one product each
    (as the compiled runtime does) over one copy of the weights, each module reading its share: the logits are
    bitwise those of the separate products, and a module called alone gives its share of the fused output."""
    if dtype == "bfloat16" and native.bf16_products() is None:
        pytest.skip("no bfloat16 product here")
    from tests.test_invariance import rounds

    target = load_target(tiny_models.target, "transformers", "cpu", dtype)
    attentions = [m for m in target.model.modules() if getattr(m, "sled_qkv", None) is not None]
    mlps = [m for m in target.model.modules() if getattr(m, "sled_gate_up", None) is not None]
    assert len(attentions) == len(mlps) == target.model.config.num_hidden_layers
    first = attentions[0]
    assert first.q_proj.weight.untyped_storage().data_ptr() == first.v_proj.weight.untyped_storage().data_ptr()
    x = torch.randn(3, target.model.config.hidden_size)
    fused = first.sled_qkv(x)
    assert torch.equal(torch.cat([first.q_proj(x), first.k_proj(x), first.v_proj(x)], dim=-1), fused)
    _, slots, starts, inputs = rounds(target, 2)
    together = target.forward_rows(slots, starts, inputs)
    for module in attentions:
        module.sled_qkv = None
    for module in mlps:
        module.sled_gate_up = None
    _, slots, starts, inputs = rounds(target, 2)
    assert torch.equal(target.forward_rows(slots, starts, inputs), together)
