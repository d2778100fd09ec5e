"""MtpHead vs an independent straight-line re-implementation of docs/contracts.md, "Numerics vLLM serves", written
here from the text.

The reference reads the raw `mtp.*` tensors with safetensors and simulates vLLM's drafter row by row: for each
prefix slot t, step 0 writes KV at position t from (x_{t+1}, h_t); step k >= 1 runs one token at position t+k
whose query sees the step-0 KV of slots <= t (same document) plus its own chain.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig

from mtptune.checkpoint.safetensors_io import SafetensorsCheckpoint
from mtptune.modeling.load import load_head

from ..conftest import SPECS


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (1.0 + w.double())


def rope(x: torch.Tensor, pos: int, rot_dim: int, theta: float) -> torch.Tensor:
    """1-D rotate-half RoPE on the first rot_dim dims of x [..., head_dim]."""
    inv = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    ang = pos * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    r, rest = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat([-r[..., half:], r[..., :half]], dim=-1)
    return torch.cat([r * cos + rotated * sin, rest], dim=-1)


class Reference:
    def __init__(self, root, cfg):
        ckpt = SafetensorsCheckpoint.open(root)
        self.w = {k: ckpt.get(k).double() for k in ckpt.keys()}
        self.cfg = cfg
        self.eps = cfg.rms_norm_eps
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        rp = cfg.rope_parameters
        self.rot_dim = int(self.hd * rp.get("partial_rotary_factor", 1.0))
        self.theta = rp["rope_theta"]
        embed_key = next(k for k in self.w if k.endswith("embed_tokens.weight") and not k.startswith("mtp."))
        self.embed = self.w[embed_key]
        self.lm_head = self.w.get("lm_head.weight", self.embed)
        norm_key = next(k for k in ("model.language_model.norm.weight", "model.norm.weight") if k in self.w)
        self.final_norm = self.w[norm_key]

    def m(self, name):
        return self.w["mtp." + name]

    def fuse(self, tok: int, hidden: torch.Tensor) -> torch.Tensor:
        e = rms(self.embed[tok], self.m("pre_fc_norm_embedding.weight"), self.eps)
        h = rms(hidden, self.m("pre_fc_norm_hidden.weight"), self.eps)
        return self.m("fc.weight") @ torch.cat([e, h])  # embedding half first

    def qkv(self, u: torch.Tensor, pos: int):
        x = rms(u, self.m("layers.0.input_layernorm.weight"), self.eps)
        qg = (self.m("layers.0.self_attn.q_proj.weight") @ x).view(self.nh, 2 * self.hd)
        q, gate = qg[:, : self.hd], qg[:, self.hd :].reshape(-1)
        k = (self.m("layers.0.self_attn.k_proj.weight") @ x).view(self.nkv, self.hd)
        v = (self.m("layers.0.self_attn.v_proj.weight") @ x).view(self.nkv, self.hd)
        q = rope(rms(q, self.m("layers.0.self_attn.q_norm.weight"), self.eps), pos, self.rot_dim, self.theta)
        k = rope(rms(k, self.m("layers.0.self_attn.k_norm.weight"), self.eps), pos, self.rot_dim, self.theta)
        return q, k, v, gate

    def attend(self, q, keys, values, gate):
        group = self.nh // self.nkv
        out = []
        for h in range(self.nh):
            K = torch.stack([k[h // group] for k in keys])
            V = torch.stack([v[h // group] for v in values])
            p = torch.softmax(K @ q[h] / math.sqrt(self.hd), dim=0)
            out.append(p @ V)
        out = torch.cat(out) * torch.sigmoid(gate)
        return self.m("layers.0.self_attn.o_proj.weight") @ out

    def mlp(self, x):
        pre = "layers.0.mlp."
        if "mtp." + pre + "gate_proj.weight" in self.w:
            return self.swiglu(x, pre)
        # Sparse MoE + sigmoid-gated shared expert. Experts may be stored per-expert or fused.
        probs = torch.softmax(self.m(pre + "gate.weight") @ x, dim=0)
        top, idx = torch.topk(probs, self.cfg.num_experts_per_tok)
        if getattr(self.cfg, "norm_topk_prob", True):
            top = top / top.sum()
        out = torch.zeros_like(x)
        for wgt, e in zip(top, idx.tolist()):
            out += wgt * self.expert(x, e)
        shared = torch.sigmoid(self.m(pre + "shared_expert_gate.weight") @ x) * self.swiglu(x, pre + "shared_expert.")
        return out + shared

    def expert(self, x, e):
        pre = "layers.0.mlp.experts."
        if f"mtp.{pre}{e}.gate_proj.weight" in self.w:
            g, u, d = (self.m(f"{pre}{e}.{p}_proj.weight") for p in ("gate", "up", "down"))
        else:
            gu = self.m(pre + "gate_up_proj")[e]
            g, u, d = gu[: gu.shape[0] // 2], gu[gu.shape[0] // 2 :], self.m(pre + "down_proj")[e]
        return d @ (torch.nn.functional.silu(g @ x) * (u @ x))

    def swiglu(self, x, pre):
        g, u, d = (self.m(f"{pre}{p}_proj.weight") for p in ("gate", "up", "down"))
        return d @ (torch.nn.functional.silu(g @ x) * (u @ x))

    def block_tail(self, u, attn):
        a = u + attn
        b = a + self.mlp(rms(a, self.m("layers.0.post_attention_layernorm.weight"), self.eps))
        return rms(b, self.m("norm.weight"), self.eps)

    def run(self, ids: list[int], residual: torch.Tensor, docs: list[int], positions: list[int], K: int):
        """Logits [K][t] for every row whose chain stays inside the sequence."""
        T = len(ids)
        h = [rms(residual[t].double(), self.final_norm, self.eps) for t in range(T)]  # h_t = FinalNorm(r_t)
        step0 = []
        for t in range(T - 1):
            u = self.fuse(ids[t + 1], h[t])
            q, k, v, gate = self.qkv(u, positions[t])
            step0.append((u, q, k, v, gate))
        results = {}
        for t in range(T - 1):
            prefix = [s for s in range(t + 1) if docs[s] == docs[t]]
            keys, values = [step0[s][2] for s in prefix], [step0[s][3] for s in prefix]
            u, q, _, _, gate = step0[t]
            o = self.block_tail(u, self.attend(q, keys, values, gate))
            results[(0, t)] = self.lm_head @ o
            for k in range(1, K):
                if t + k + 1 >= T:
                    break
                u = self.fuse(ids[t + k + 1], o)
                q, kk, vv, gate = self.qkv(u, positions[t] + k)
                keys, values = [*keys, kk], [*values, vv]
                o = self.block_tail(u, self.attend(q, keys, values, gate))
                results[(k, t)] = self.lm_head @ o
        return results


@pytest.mark.parametrize(
    "name",
    [
        "qwen3_5-conditional-untied-sharded",
        "qwen3_5-text-tied-single",
        "qwen3_5_moe-fused-single",
        "qwen3_next-per_expert-sharded",
    ],
)
def test_head_matches_straight_line_reference(tiny_verifiers, name):
    root = tiny_verifiers[name]
    head, _, verifier = load_head(root, dtype=torch.float64, shared_dtype=torch.float64)
    reference = Reference(root, verifier.text_config)
    torch.manual_seed(0)
    # Two packed documents (lengths 6 and 5): positions reset, attention must stay inside each document.
    positions = [*range(6), *range(5)]
    docs = [0] * 6 + [1] * 5
    ids = torch.randint(0, SPECS[name].vocab_size, (11,)).tolist()
    residual = torch.randn(11, verifier.text_config.hidden_size, dtype=torch.float64) * 3
    K = 3
    expected = reference.run(ids, residual, docs, positions, K)
    outputs = head(torch.tensor([ids]), residual[None], torch.tensor([positions]), num_steps=K)
    checked = 0
    for (k, t), ref_logits in expected.items():
        if docs[min(t + k + 1, 10)] != docs[t]:
            continue  # the step's input token lies in the next document: masked in training, not served
        got = head.logits(outputs[k][0, t])
        torch.testing.assert_close(got, ref_logits, rtol=1e-7, atol=1e-7)
        checked += 1
    assert checked >= 15


def test_pre_norm_input_is_normed_once(tiny_verifier):
    """Given post-norm states with hidden_is_pre_norm=False, the head must match feeding pre-norm states."""
    head, _, verifier = load_head(tiny_verifier, dtype=torch.float64, shared_dtype=torch.float64)
    residual = torch.randn(1, 7, verifier.text_config.hidden_size, dtype=torch.float64)
    ids = torch.randint(0, 1000, (1, 7))
    from_pre = head(ids, residual, num_steps=2)
    from_post = head(ids, head.verifier_final_norm(residual), num_steps=2, hidden_is_pre_norm=False)
    no_norm = head(ids, residual, num_steps=2, input_norm="none")
    torch.testing.assert_close(from_pre[1], from_post[1])
    assert not torch.allclose(from_pre[0], no_norm[0], atol=1e-3)


def test_bf16_head_close_to_fp64(tiny_verifier):
    head64, _, verifier = load_head(tiny_verifier, dtype=torch.float64, shared_dtype=torch.float64)
    head16, _, _ = load_head(tiny_verifier, verifier=verifier)
    ids = torch.randint(0, 1000, (1, 9))
    residual = torch.randn(1, 9, verifier.text_config.hidden_size)
    a = head64.logits(head64(ids, residual.double(), num_steps=2)[1])
    b = head16.logits(head16(ids, residual.bfloat16(), num_steps=2)[1]).double()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8
    assert torch.allclose(a, b, atol=0.1, rtol=0.05)


def test_config_attention_is_mtptune_chain(tiny_verifier):
    head, _, _ = load_head(tiny_verifier)
    assert head.layers[0].self_attn.config._attn_implementation == "mtptune_chain"
    assert AutoConfig.from_pretrained(tiny_verifier).get_text_config().mtp_num_hidden_layers == 1
