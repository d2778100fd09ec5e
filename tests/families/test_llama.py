"""The `llama` family: a fresh MTP head for a verifier without one (SmolLM2's architecture).

A tiny real `LlamaForCausalLM` (tied and untied, single file and sharded, written by transformers' own
`save_pretrained`) goes through convert --init -> stitch (attach) -> load back, and the head's numerics are checked
against a straight-line re-implementation of docs/contracts.md, "Numerics vLLM serves", with Llama-style norms
(`x̂ · w`) and the Llama block.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mtptune.checkpoint.head_checkpoint import load_head_checkpoint, save_head_checkpoint
from mtptune.checkpoint.safetensors_io import SafetensorsCheckpoint
from mtptune.checkpoint.verifier import Verifier
from mtptune.cli.main import main
from mtptune.convert import convert_model
from mtptune.errors import CheckpointError
from mtptune.modeling.load import load_head
from mtptune.stitch import stitch

VOCAB = 1000
LLAMAS = {"tied-single": (True, None), "untied-sharded": (False, "200KB")}


def write_tiny_llama(path, tied: bool, max_shard_size: str | None) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=tied,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():  # non-trivial norms, so that copying them is observable
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return str(path)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("llamas")
    return {name: write_tiny_llama(root / name, *args) for name, args in LLAMAS.items()}


def test_convert_without_init_says_to_pass_it(llamas, tmp_path):
    with pytest.raises(CheckpointError, match="--init fresh"):
        convert_model(llamas["tied-single"], output_path=tmp_path / "head")
    verifier = Verifier.open(llamas["tied-single"])
    assert verifier.family.name == "llama" and verifier.family.num_mtp_layers(verifier.text_config) == 0


def test_copy_last_layer_init(llamas, tmp_path):
    root = llamas["untied-sharded"]
    out = convert_model(root, output_path=tmp_path / "head", init="copy-last-layer")
    config, state = load_head_checkpoint(out)
    assert config.family == "llama" and config.init == "copy-last-layer" and config.dtype == "bfloat16"
    ckpt = SafetensorsCheckpoint.open(root)
    for key, value in state.items():
        if key.startswith("layers.0."):
            assert torch.equal(value, ckpt.get("model.layers.1." + key[len("layers.0.") :])), key
    assert torch.equal(state["norm.weight"], ckpt.get("model.norm.weight"))
    assert torch.equal(state["fc.weight"][:, 64:], torch.eye(64, dtype=torch.bfloat16))
    assert state["fc.weight"][:, :64].abs().max() < 0.2
    assert torch.equal(state["pre_fc_norm_hidden.weight"], torch.ones(64, dtype=torch.bfloat16))


def test_fresh_is_the_measured_better_init_random(llamas, tmp_path):
    """docs/results.md: on SmolLM2 / GSM8K a random-init head trains to a higher tau_sim than copy-last-layer."""
    config, _ = load_head_checkpoint(convert_model(llamas["tied-single"], output_path=tmp_path / "h", init="fresh"))
    assert config.init == "random"


def test_random_init_and_seed(llamas, tmp_path):
    a = load_head_checkpoint(convert_model(llamas["tied-single"], output_path=tmp_path / "a", init="random"))[1]
    b = load_head_checkpoint(convert_model(llamas["tied-single"], output_path=tmp_path / "b", init="random"))[1]
    c = load_head_checkpoint(convert_model(llamas["tied-single"], output_path=tmp_path / "c", init="random", seed=1))[1]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc.weight"], c["fc.weight"])
    assert abs(a["layers.0.mlp.up_proj.weight"].float().std().item() - 0.02) < 0.005
    assert torch.equal(a["norm.weight"], torch.ones(64, dtype=torch.bfloat16))


def perturbed_head(llama_root: str, tmp_path, seed: int = 0) -> str:
    """A random-init head with non-identity norms, saved as a head checkpoint (what training would write)."""
    config, state = load_head_checkpoint(
        convert_model(llama_root, output_path=tmp_path / f"fresh{seed}", init="random")
    )
    g = torch.Generator().manual_seed(seed)
    state = {
        k: (v.float() + (0.3 if v.ndim == 1 else 0.05) * torch.randn(v.shape, generator=g)).to(v.dtype)
        for k, v in state.items()
    }
    return str(save_head_checkpoint(tmp_path / f"trained{seed}", config, state))


@pytest.mark.parametrize("name", sorted(LLAMAS))
def test_stitch_attaches_and_loads_back(llamas, tmp_path, name):
    root = llamas[name]
    head_dir = perturbed_head(root, tmp_path)
    report = stitch(head_dir, root, output_path=tmp_path / "stitched")
    out = report.output
    assert report.attached and report.rewritten_shards == ["mtp.safetensors"]
    original, stitched = SafetensorsCheckpoint.open(root), SafetensorsCheckpoint.open(out)
    for key in original.keys():  # the trunk is bit-identical, in its own files (hard-linked)
        assert original.weight_map[key] == stitched.weight_map[key]
        assert torch.equal(original.get(key), stitched.get(key)), key
    for shard in original.shards():
        assert os.path.samefile(os.path.join(root, shard), out / shard)
    head_keys = {k for k in stitched.keys() if k.startswith("mtp.")}
    assert head_keys == {"mtp." + k for k in load_head_checkpoint(head_dir)[1]}
    assert set(load_file(out / "mtp.safetensors")) == head_keys
    before, after = (json.loads((p / "config.json").read_text()) for p in (original.root, out))
    assert after == {**before, "mtp_num_hidden_layers": 1, "mtptune_mtp_family": "llama"}

    # mtptune reads the stitched folder back as a verifier with a native llama head, equal to the trained one.
    trained, _, _ = load_head(head_dir, verifier=root)
    native, config, verifier = load_head(out)
    assert verifier.family.name == "llama" and config.family == "llama"
    assert all(torch.equal(native.state_dict()[k], v) for k, v in trained.state_dict().items())
    assert torch.equal(native.embed_tokens, trained.embed_tokens) and torch.equal(native.lm_head, trained.lm_head)

    # transformers still loads the trunk exactly as before.
    ids = torch.randint(0, VOCAB, (1, 9))
    logits = [AutoModelForCausalLM.from_pretrained(p).eval()(ids).logits for p in (root, out)]
    assert torch.equal(*logits)

    # Stitching again into the attached folder is the ordinary replace mode: key set, config and index unchanged.
    again = stitch(perturbed_head(root, tmp_path, seed=1), out, output_path=tmp_path / "again")
    assert not again.attached and again.changed == len(head_keys)
    assert SafetensorsCheckpoint.open(again.output).weight_map == stitched.weight_map


def test_stitch_refuses_a_headless_verifier_of_another_family(llamas, tmp_path, tiny_verifier):
    head_dir = perturbed_head(llamas["tied-single"], tmp_path)
    with pytest.raises(CheckpointError, match="qwen3_5"):
        stitch(head_dir, tiny_verifier, output_path=tmp_path / "x")


def test_cli_convert_init_and_stitch(llamas, tmp_path, capsys):
    root = llamas["tied-single"]
    assert main(["convert", root, "--output-path", str(tmp_path / "h")]) == 2
    assert "--init fresh" in capsys.readouterr().err
    assert main(["convert", root, "--init", "copy-last-layer", "--output-path", str(tmp_path / "h")]) == 0
    assert main(["stitch", str(tmp_path / "h"), root, "--output-path", str(tmp_path / "s")]) == 0
    assert "attached" in capsys.readouterr().out
    assert Verifier.open(str(tmp_path / "s")).trainable_head_keys()


# --- numerics ---------------------------------------------------------------------------------------------------


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()  # Llama-style: x̂ · w


def rope(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    ang = pos / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1) * sin


class Reference:
    """The numerics vLLM serves (docs/contracts.md) row by row from the stitched folder's raw tensors: fuse [emb;
    hidden], Llama block, mtp.norm, recursion."""

    def __init__(self, root, cfg):
        ckpt = SafetensorsCheckpoint.open(root)
        self.w = {k: ckpt.get(k).double() for k in ckpt.keys()}
        self.cfg, self.eps = cfg, cfg.rms_norm_eps
        self.embed = self.w["model.embed_tokens.weight"]
        self.lm_head = self.w.get("lm_head.weight", self.embed)

    def m(self, name: str) -> torch.Tensor:
        return self.w["mtp." + name]

    def fuse(self, tok: int, hidden: torch.Tensor) -> torch.Tensor:
        e = rms(self.embed[tok], self.m("pre_fc_norm_embedding.weight"), self.eps)
        h = rms(hidden, self.m("pre_fc_norm_hidden.weight"), self.eps)
        return self.m("fc.weight") @ torch.cat([e, h])  # no position-0 zeroing (Qwen-style)

    def block_last(self, us: list[torch.Tensor], positions: list[int]) -> torch.Tensor:
        cfg = self.cfg
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        theta = cfg.rope_parameters["rope_theta"]
        xs = [rms(u, self.m("layers.0.input_layernorm.weight"), self.eps) for u in us]
        keys = [
            rope((self.m("layers.0.self_attn.k_proj.weight") @ x).view(nkv, hd), p, theta)
            for x, p in zip(xs, positions)
        ]
        values = [(self.m("layers.0.self_attn.v_proj.weight") @ x).view(nkv, hd) for x in xs]
        q = rope((self.m("layers.0.self_attn.q_proj.weight") @ xs[-1]).view(nh, hd), positions[-1], theta)
        heads = []
        for h in range(nh):
            K = torch.stack([k[h // (nh // nkv)] for k in keys])
            V = torch.stack([v[h // (nh // nkv)] for v in values])
            heads.append(torch.softmax(K @ q[h] / math.sqrt(hd), dim=0) @ V)
        a = us[-1] + self.m("layers.0.self_attn.o_proj.weight") @ torch.cat(heads)
        x = rms(a, self.m("layers.0.post_attention_layernorm.weight"), self.eps)
        g, u, d = (self.m(f"layers.0.mlp.{p}_proj.weight") for p in ("gate", "up", "down"))
        return a + d @ (torch.nn.functional.silu(g @ x) * (u @ x))

    def run(self, ids: list[int], residual: torch.Tensor, docs: list[int], positions: list[int], K: int) -> dict:
        T = len(ids)
        h = [rms(residual[t], self.w["model.norm.weight"], self.eps) for t in range(T)]  # h_t = FinalNorm(r_t)
        step0 = [self.fuse(ids[t + 1], h[t]) for t in range(T - 1)]
        results = {}
        for t in range(T - 1):
            prefix = [s for s in range(t + 1) if docs[s] == docs[t]]
            us, ps = [step0[s] for s in prefix], [positions[s] for s in prefix]
            o = rms(self.block_last(us, ps), self.m("norm.weight"), self.eps)
            results[(0, t)] = self.lm_head @ o
            for k in range(1, K):
                if t + k + 1 >= T or docs[t + k + 1] != docs[t]:
                    break
                us, ps = [*us, self.fuse(ids[t + k + 1], o)], [*ps, positions[t] + k]
                o = rms(self.block_last(us, ps), self.m("norm.weight"), self.eps)
                results[(k, t)] = self.lm_head @ o
        return results


@pytest.mark.parametrize("name", sorted(LLAMAS))
def test_head_matches_reference(llamas, tmp_path, name):
    out = stitch(perturbed_head(llamas[name], tmp_path), llamas[name], output_path=tmp_path / "stitched").output
    head, _, verifier = load_head(out, dtype=torch.float64, shared_dtype=torch.float64)
    reference = Reference(out, verifier.text_config)
    torch.manual_seed(0)
    positions, docs = [*range(6), *range(5)], [0] * 6 + [1] * 5  # two packed documents
    ids = torch.randint(0, VOCAB, (11,)).tolist()
    residual = torch.randn(11, 64, dtype=torch.float64) * 3
    expected = reference.run(ids, residual, docs, positions, K=3)
    outputs = head(torch.tensor([ids]), residual[None], torch.tensor([positions]), num_steps=3)
    for (k, t), ref_logits in expected.items():
        torch.testing.assert_close(head.logits(outputs[k][0, t]), ref_logits, rtol=1e-5, atol=1e-6)
    assert len(expected) >= 20


def test_copied_layer_head_repeats_the_trunks_last_layer(llamas, tmp_path):
    """With fc = [0 | I] the copy-last-layer head computes FinalNorm(L_last(N_hid(h_t))): check against transformers'
    own layer, which guards the copy (names, norms, block class)."""
    root = llamas["untied-sharded"]
    head, _, verifier = load_head(
        convert_model(root, output_path=tmp_path / "h", init="copy-last-layer"), verifier=root, dtype=torch.float64
    )
    with torch.no_grad():
        head.fc.weight[:, :64] = 0
    trunk = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float64).eval()
    h = torch.randn(1, 7, 64, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (1, 7))
    o = head(ids, h, num_steps=1, input_norm="none", hidden_is_pre_norm=False)[0]
    x = rms(h[0], torch.ones(64), verifier.text_config.rms_norm_eps)[None]
    pos = torch.arange(7)[None]
    expected = trunk.model.norm(
        trunk.model.layers[-1](
            x, position_embeddings=trunk.model.rotary_emb(x, pos), attention_mask=None, position_ids=pos
        )
    )
    torch.testing.assert_close(o, expected, rtol=1e-6, atol=1e-6)
