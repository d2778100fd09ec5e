"""MtpHead on DeepSeek-V3 / GLM-4.5 / MiMo vs references written here from vLLM's drafters (docs/families.md,
docs/contracts.md "One MTP step" and "Attention pattern").

The fuse stage is straight-line from the raw on-disk tensors: Llama-style RMSNorm (`x̂ · w`), embedding zeroed at
position 0, `[enorm(emb); hnorm(h)]` (DeepSeek / GLM) or the reversed `[hidden_layernorm(h); token_layernorm(emb)]`
(MiMo), output norm `shared_head.norm` / `final_layernorm`, recursion on that output. The serving pattern is
simulated row by row: step 0 of slot t sees the step-0 inputs of slots <= t of its document; step k runs one
token at position t+k that also sees its own chain. The decoder block is either
* a straight-line Qwen2 block (MiMo: q/k/v biases, GQA, full rotate-half RoPE, SwiGLU), or
* transformers' own decoder layer (DeepSeek MLA + sigmoid-routed MoE, GLM) run with eager attention and an explicit
  causal mask over [prefix ; chain] — independent of mtptune's chain attention, which is what is under test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mtptune.checkpoint.head_checkpoint import load_head_checkpoint
from mtptune.checkpoint.safetensors_io import SafetensorsCheckpoint
from mtptune.convert import convert_model
from mtptune.families import family_by_name
from mtptune.families.moe_experts import fuse_experts
from mtptune.modeling.head import step_targets
from mtptune.modeling.load import load_head

from .conftest import FAMILY_SPECS

NAMES = {  # (prefix, embedding norm, hidden norm, fuse projection, output norm)
    "deepseek_v3": ("model.layers.2.", "enorm", "hnorm", "eh_proj", "shared_head.norm"),
    "glm4_moe": ("model.layers.2.", "enorm", "hnorm", "eh_proj", "shared_head.norm"),
    "mimo": ("model.mtp_layers.0.", "token_layernorm", "hidden_layernorm", "input_proj", "final_layernorm"),
}
FUSE = {"enorm", "hnorm", "eh_proj", "shared_head", "embed_tokens", "token_layernorm", "hidden_layernorm"}
FUSE |= {"input_proj", "final_layernorm"}


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


def rope(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    ang = pos / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1) * sin


class Reference:
    def __init__(self, root, family_name: str, cfg, hf_block: bool):
        ckpt = SafetensorsCheckpoint.open(root)
        self.w = {k: ckpt.get(k).double() for k in ckpt.keys()}
        self.cfg, self.eps, self.family_name = cfg, cfg.rms_norm_eps, family_name
        self.prefix, self.n_emb, self.n_hid, self.proj, self.n_out = NAMES[family_name]
        self.embed = self.w["model.embed_tokens.weight"]
        self.lm_head = self.w.get("lm_head.weight", self.embed)
        self.final_norm = self.w["model.norm.weight"]
        self.layer = self._hf_layer(family_name) if hf_block else None

    def m(self, name: str) -> torch.Tensor:
        return self.w[self.prefix + name]

    def _hf_layer(self, family_name: str):
        family = family_by_name(family_name)
        cfg = copy.deepcopy(self.cfg)
        cfg._attn_implementation, cfg._experts_implementation = "eager", "eager"
        layer = family.build_decoder_layer(cfg).double()
        block = {
            k[len(self.prefix) :]: v
            for k, v in self.w.items()
            if k.startswith(self.prefix) and k[len(self.prefix) :].split(".")[0] not in FUSE
        }
        layer.load_state_dict(fuse_experts(block), strict=True)
        self.rotary = family.build_rotary(cfg)
        return layer

    def fuse(self, tok: int, pos: int, hidden: torch.Tensor) -> torch.Tensor:
        emb = torch.zeros_like(self.embed[tok]) if pos == 0 else self.embed[tok]  # vLLM zeroes position 0
        e = rms(emb, self.m(self.n_emb + ".weight"), self.eps)
        h = rms(hidden, self.m(self.n_hid + ".weight"), self.eps)
        cat = torch.cat([h, e]) if self.family_name == "mimo" else torch.cat([e, h])
        return self.m(self.proj + ".weight") @ cat

    def block_last(self, us: list[torch.Tensor], positions: list[int]) -> torch.Tensor:
        """The block's output for the last of `us`, which attends causally to all of them."""
        if self.layer is None:
            return self.qwen2_block_last(us, positions)
        x = torch.stack(us)[None]
        L = len(us)
        mask = torch.full((L, L), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1)[None, None]
        cos_sin = self.rotary(x, torch.tensor([positions]))
        with torch.no_grad():
            return self.layer(x, attention_mask=mask, position_embeddings=cos_sin)[0, -1]

    def qwen2_block_last(self, us: list[torch.Tensor], positions: list[int]) -> torch.Tensor:
        cfg = self.cfg
        nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        hd = cfg.hidden_size // nh
        theta = cfg.rope_parameters["rope_theta"]

        def proj(name: str, x: torch.Tensor) -> torch.Tensor:
            return self.m(f"self_attn.{name}.weight") @ x + self.m(f"self_attn.{name}.bias")

        xs = [rms(u, self.m("input_layernorm.weight"), self.eps) for u in us]
        keys = [rope(proj("k_proj", x).view(nkv, hd), p, theta) for x, p in zip(xs, positions)]
        values = [proj("v_proj", x).view(nkv, hd) for x in xs]
        q = rope(proj("q_proj", xs[-1]).view(nh, hd), positions[-1], theta)
        heads = []
        for h in range(nh):
            K = torch.stack([k[h // (nh // nkv)] for k in keys])
            V = torch.stack([v[h // (nh // nkv)] for v in values])
            heads.append(torch.softmax(K @ q[h] / math.sqrt(hd), dim=0) @ V)
        a = us[-1] + self.m("self_attn.o_proj.weight") @ torch.cat(heads)
        x = rms(a, self.m("post_attention_layernorm.weight"), self.eps)
        g, u, d = (self.m(f"mlp.{p}_proj.weight") for p in ("gate", "up", "down"))
        return a + d @ (torch.nn.functional.silu(g @ x) * (u @ x))

    def run(self, ids: list[int], residual: torch.Tensor, docs: list[int], positions: list[int], K: int) -> dict:
        T = len(ids)
        h = [rms(residual[t], self.final_norm, self.eps) for t in range(T)]  # h_t = FinalNorm(r_t)
        step0 = [self.fuse(ids[t + 1], positions[t], h[t]) for t in range(T - 1)]
        results = {}
        for t in range(T - 1):
            prefix = [s for s in range(t + 1) if docs[s] == docs[t]]
            us, ps = [step0[s] for s in prefix], [positions[s] for s in prefix]
            o = rms(self.block_last(us, ps), self.m(self.n_out + ".weight"), self.eps)
            results[(0, t)] = self.lm_head @ o
            for k in range(1, K):
                if t + k + 1 >= T or docs[t + k + 1] != docs[t]:
                    break  # the step's input token lies past the document: masked in training, never served
                us, ps = [*us, self.fuse(ids[t + k + 1], positions[t] + k, o)], [*ps, positions[t] + k]
                o = rms(self.block_last(us, ps), self.m(self.n_out + ".weight"), self.eps)
                results[(k, t)] = self.lm_head @ o
        return results


CASES = [
    ("mimo-single", False),  # straight-line Qwen2 block
    ("mimo-single", True),
    ("deepseek_v3-sharded", True),
    ("deepseek_v3-fused-tied", True),
    ("glm4_moe-sharded", True),
]


@pytest.mark.parametrize(("name", "hf_block"), CASES)
def test_head_matches_reference(family_verifiers, name, hf_block):
    root = family_verifiers[name]
    head, _, verifier = load_head(root, dtype=torch.float64, shared_dtype=torch.float64)
    reference = Reference(root, FAMILY_SPECS[name].family, verifier.text_config, hf_block)
    torch.manual_seed(0)
    positions, docs = [*range(6), *range(5)], [0] * 6 + [1] * 5  # two packed documents
    ids = torch.randint(0, FAMILY_SPECS[name].vocab_size, (11,)).tolist()
    residual = torch.randn(11, verifier.text_config.hidden_size, dtype=torch.float64) * 3
    K = 3
    expected = reference.run(ids, residual, docs, positions, K)
    outputs = head(torch.tensor([ids]), residual[None], torch.tensor([positions]), num_steps=K)
    for (k, t), ref_logits in expected.items():
        torch.testing.assert_close(head.logits(outputs[k][0, t]), ref_logits, rtol=1e-5, atol=1e-6)
    assert len(expected) >= 20


def test_position_zero_embedding_and_concat_order_matter(family_verifiers):
    """Guards the reference itself: zeroing and the order change the result, so the match above means something."""
    root = family_verifiers["mimo-single"]
    head, _, verifier = load_head(root, dtype=torch.float64, shared_dtype=torch.float64)
    ids = torch.randint(0, 1000, (1, 6))
    residual = torch.randn(1, 6, verifier.text_config.hidden_size, dtype=torch.float64)
    base = head(ids, residual)[0]
    other_first = ids.clone()
    other_first[0, 1] = (ids[0, 1] + 1) % 1000  # the token consumed at position 0
    assert torch.equal(head(other_first, residual)[0][0, 0], base[0, 0])
    swapped = head(ids, residual)  # same head with the order flipped must differ
    head.family = copy.copy(head.family)
    head.family.concat_order = "embedding_first"
    assert not torch.allclose(head(ids, residual)[0], swapped[0])


@pytest.mark.parametrize("name", ["deepseek_v3-sharded", "glm4_moe-sharded", "mimo-single"])
def test_converted_head_trains(family_verifiers, tmp_path, name):
    """Head checkpoint -> bf16 head -> K-step loss -> gradients on the head only; router bias stays fp32."""
    converted = convert_model(family_verifiers[name], output_path=tmp_path / "converted")
    _, state = load_head_checkpoint(converted)
    head, config, verifier = load_head(converted, verifier=str(family_verifiers[name]))
    assert config.family == FAMILY_SPECS[name].family
    for key, buffer in head.named_buffers():
        if key.rsplit(".", 1)[-1] in head.family.fp32_buffers:
            assert buffer.dtype == torch.float32 and torch.equal(buffer, state[key])
    head.train()
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 12))
    residual = torch.randn(2, 12, verifier.text_config.hidden_size, dtype=torch.bfloat16)
    positions = torch.arange(12).expand(2, 12)
    loss = torch.zeros((), dtype=torch.float32)
    for k, out in enumerate(head(ids, residual, positions, num_steps=2)):
        targets, valid = step_targets(ids, torch.ones_like(ids), positions, k)
        logits = head.logits(out).float()
        loss = loss + torch.nn.functional.cross_entropy(logits[valid], targets[valid])
    assert torch.isfinite(loss)
    loss.backward()
    assert head.fc.weight.grad is not None and head.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in head.named_parameters() if "experts" not in n and "gate" not in n)
    assert not head.embed_tokens.requires_grad and "embed_tokens" not in head.state_dict()
