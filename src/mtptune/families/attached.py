"""Families whose verifiers ship no MTP head: mtptune creates one and attaches it in the Qwen-style layout.

The head is the same module as every native head (`fc` over `[N_emb(E[y]); N_hid(g)]`, one decoder layer of the
verifier's own class, output `norm`, the verifier's frozen embedding / LM head); only its origin differs:
`mtptune convert --init ...` initialises it (modeling/fresh_head.py) and `mtptune stitch` writes it into a copy of
the verifier as extra `mtp.*` tensors (a shard `mtp.safetensors` plus an index), with config fields that make the
folder self-describing:

* `mtp_num_hidden_layers: 1` — the depth, under Qwen3.5's field name;
* `mtptune_mtp_family: <family>` — which family wrote it (vLLM has no drafter for these architectures).

mtptune's Verifier / load_head / evaluator read such a folder back like a native-MTP verifier; transformers loads
its trunk from the untouched weights and never sees the head.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from mtptune.families.qwen import QwenMtpFamily

FAMILY_FIELD = "mtptune_mtp_family"
DEPTH_FIELD = "mtp_num_hidden_layers"


class AttachedHeadFamily(QwenMtpFamily):
    attaches_head = True
    zero_embedding_at_position_0 = False  # Qwen-style: our own layout, nothing to match in a serving engine

    def num_mtp_layers(self, text_config: PretrainedConfig) -> int:
        return int(getattr(text_config, DEPTH_FIELD, 0) or 0)

    def attach_config_fields(self) -> dict[str, object]:
        """The config.json fields a stitched (attached) checkpoint gains."""
        return {DEPTH_FIELD: 1, FAMILY_FIELD: self.name}
