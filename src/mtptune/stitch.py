"""Step 5 of the workflow: write a servable copy of the verifier whose only changed tensors are the `mtp.*` head.

Contract (contracts c6): every head tensor goes back under the verifier's own name, layout (per-expert or
fused experts, as the verifier stores them), dtype and shard; shards without head tensors are hard-linked
(or copied with `copy_untouched=True`, and always copied when linking fails); config.json and the index are
left as they are. After writing, the output is verified tensor by tensor; any failure removes the partial
output and raises.

Attach mode (automatic for a verifier without `mtp.*` tensors whose family `attaches_head`, e.g. Llama): the head
goes into a new shard `mtp.safetensors` in the Qwen-style `mtp.*` layout; every verifier file is hard-linked or
copied untouched; the index gains the head's keys (a single-file verifier gets a new index beside its
`model.safetensors`, which transformers keeps loading alone, so the trunk loads exactly as before); config.json
gains only the family's fields (`mtp_num_hidden_layers`, `mtptune_mtp_family`). Verification: the verifier's
tensors bit-identical and in their original files, the head's written exactly, config unchanged but for those
fields. Stitching again into the attached output is the ordinary replace mode.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mtptune.checkpoint.head_checkpoint import load_head_checkpoint
from mtptune.checkpoint.safetensors_io import INDEX_NAME, SINGLE_NAME, SafetensorsCheckpoint, read_config_dict
from mtptune.checkpoint.verifier import Verifier
from mtptune.errors import CheckpointError
from mtptune.families import family_by_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StitchReport:
    output: Path
    replaced: int  # head tensors written
    rewritten_shards: list[str]
    linked_shards: list[str]
    copied_shards: list[str]
    changed: int  # head tensors whose values differ from the verifier's
    attached: bool = False  # the verifier had no head: the head was added (attach mode), not replaced


def stitch(
    checkpoint: str | os.PathLike,
    verifier: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    copy_untouched: bool = False,
    overwrite: bool = False,
) -> StitchReport:
    head_config, head_state = load_head_checkpoint(checkpoint)
    ver = Verifier.open(str(verifier))
    family = family_by_name(head_config.family)
    if family.name != ver.family.name:
        raise CheckpointError(
            f"cannot stitch a {family.name} head into {ver.root}, a {ver.family.name} verifier "
            f"(the head was trained for {head_config.verifier_name_or_path})."
        )
    output = Path(output_path) if output_path else Path.cwd() / f"{ver.root.resolve().name}-stitched"
    if output.resolve() == ver.root.resolve():
        raise CheckpointError(f"--output-path {output} is the verifier itself; stitch writes a copy.")
    if output.exists() and not overwrite:
        raise CheckpointError(f"{output} already exists; pass --overwrite or choose another --output-path.")
    if Path(head_config.verifier_name_or_path).name != ver.root.name and head_config.verifier_name_or_path != str(
        verifier
    ):
        logger.warning(
            "head %s was made for verifier %s, stitching into %s (shapes fit; make sure this is intended)",
            checkpoint,
            head_config.verifier_name_or_path,
            verifier,
        )
    attach = not ver.trainable_head_keys() and family.attaches_head
    native = (
        _attached_head_tensors(family, head_state, ver)
        if attach
        else _native_head_tensors(family, head_state, ver, checkpoint)
    )

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        if attach:
            report = _write_attached(ver, family, native, tmp, copy_untouched)
            _verify_attached(ver, family, native, tmp)
        else:
            report = _write(ver.checkpoint, native, tmp, copy_untouched)
            _verify(ver.checkpoint, native, tmp)
        _make_readable(tmp)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = StitchReport(output=output, **report)
    logger.info(
        "%s %d head tensors (%d changed) into %s; wrote %s, hard-linked %d, copied %d untouched shards",
        "attached" if report.attached else "stitched",
        report.replaced,
        report.changed,
        output,
        report.rewritten_shards,
        len(report.linked_shards),
        len(report.copied_shards),
    )
    return report


def _native_head_tensors(family, head_state, ver: Verifier, source) -> dict[str, torch.Tensor]:
    # Frozen MTP copies of verifier tensors (DeepSeek's shared_head.head / embed_tokens) are neither written nor
    # expected from the head; `_verify` then checks them bit-identical like every other non-head tensor.
    verifier_keys = set(ver.trainable_head_keys())
    if not verifier_keys:
        raise CheckpointError(f"verifier {ver.root} has no mtp.* tensors to replace; it is not an MTP verifier.")
    native = family.head_to_native(head_state, verifier_keys)
    missing, unexpected = sorted(verifier_keys - set(native)), sorted(set(native) - verifier_keys)
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"not in the verifier {unexpected[:3]}"
        raise CheckpointError(f"head {source} does not match verifier {ver.root}: {detail}.")
    out = {}
    for key, value in native.items():
        target_shape = ver.checkpoint.shape(key)
        if tuple(value.shape) != target_shape:
            raise CheckpointError(
                f"head {source}: {key} has shape {tuple(value.shape)} but verifier {ver.root} has {target_shape}; "
                "this head does not fit this verifier."
            )
        out[key] = value.to(ver.checkpoint.get(key).dtype).contiguous()
    return out


def _write(ckpt: SafetensorsCheckpoint, native: dict[str, torch.Tensor], tmp: Path, copy_untouched: bool) -> dict:
    shards_with_head = {ckpt.weight_map[k] for k in native}
    rewritten, linked, copied, changed = [], [], [], 0
    for entry in sorted(ckpt.root.iterdir()):
        target = tmp / entry.name
        if entry.name in shards_with_head:
            tensors, metadata = {}, None
            with safe_open(entry, framework="pt") as f:
                metadata = f.metadata()
                for key in f.keys():
                    if key in native:
                        changed += int(not torch.equal(f.get_tensor(key), native[key]))
                        tensors[key] = native[key]
                    else:
                        tensors[key] = f.get_tensor(key)
            save_file(tensors, target, metadata=metadata)
            rewritten.append(entry.name)
        else:
            _copy_untouched(entry, target, copy_untouched, linked, copied)
    return {
        "replaced": len(native),
        "rewritten_shards": rewritten,
        "linked_shards": linked,
        "copied_shards": copied,
        "changed": changed,
    }


def _make_readable(folder: Path) -> None:
    """mkdtemp creates 0700; give the finished folder the permissions a plain mkdir would have."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)


def _copy_untouched(entry: Path, target: Path, copy_untouched: bool, linked: list[str], copied: list[str]) -> None:
    """Bring a verifier file the head does not touch into the output: shards hard-linked (copied when asked or
    when linking fails), folders and other files copied."""
    if entry.is_dir():
        shutil.copytree(entry, target, symlinks=True)
    elif entry.suffix == ".safetensors" and not copy_untouched and _try_link(entry, target):
        linked.append(entry.name)
    else:
        shutil.copy2(entry, target)
        if entry.suffix == ".safetensors":
            copied.append(entry.name)


def _try_link(src: Path, dst: Path) -> bool:
    try:
        os.link(src.resolve(), dst)
        return True
    except OSError:
        return False


def _verify(original: SafetensorsCheckpoint, native: dict[str, torch.Tensor], out_dir: Path) -> None:
    stitched = SafetensorsCheckpoint.open(out_dir)
    if stitched.weight_map != original.weight_map:
        raise CheckpointError("stitch verification failed: the tensor set or shard assignment changed.")
    for key, shard in original.weight_map.items():
        new = stitched.get(key)
        expected = native.get(key)
        if expected is None:
            expected = original.get(key)
        if new.dtype != expected.dtype or new.shape != expected.shape or not torch.equal(new, expected):
            what = "head tensor was not written" if key in native else "non-head tensor changed"
            raise CheckpointError(f"stitch verification failed: {key} in {shard}: {what}.")


ATTACHED_SHARD = "mtp.safetensors"


def _attached_head_tensors(family, head_state, ver: Verifier) -> dict[str, torch.Tensor]:
    """The head under its `mtp.*` names in the verifier's weight dtype (its embedding's)."""
    native = family.head_to_native(head_state, set())
    clash = sorted(set(native) & set(ver.checkpoint.weight_map))
    if clash:
        raise CheckpointError(f"verifier {ver.root} already holds {clash[0]!r}; cannot attach a head next to it.")
    dtype = ver.checkpoint.get(ver.shared_names().embed).dtype
    return {k: v.to(dtype).contiguous() for k, v in native.items()}


def _write_attached(ver: Verifier, family, native: dict[str, torch.Tensor], tmp: Path, copy_untouched: bool) -> dict:
    ckpt = ver.checkpoint
    if (ckpt.root / ATTACHED_SHARD).exists():
        raise CheckpointError(f"{ckpt.root / ATTACHED_SHARD} exists but holds no mtp.* tensor the index names.")
    linked, copied = [], []
    for entry in sorted(ckpt.root.iterdir()):
        target = tmp / entry.name
        if entry.name in ("config.json", INDEX_NAME):
            continue
        _copy_untouched(entry, target, copy_untouched, linked, copied)
    save_file(native, tmp / ATTACHED_SHARD, metadata={"format": "pt", "producer": "mtptune", "mtp_family": family.name})
    index = dict(ckpt.index) if ckpt.index is not None else {"metadata": {}}
    weight_map = {**ckpt.weight_map, **dict.fromkeys(native, ATTACHED_SHARD)}
    metadata = dict(index.get("metadata") or {})
    metadata["total_size"] = sum(
        (tmp / shard).stat().st_size for shard in sorted(set(weight_map.values()))
    )  # file sizes: an upper bound like transformers' own, never read for loading
    index.update(metadata=metadata, weight_map=dict(sorted(weight_map.items())))
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    config = read_config_dict(ckpt.root)
    config.update(family.attach_config_fields())
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {
        "replaced": len(native),
        "rewritten_shards": [ATTACHED_SHARD],
        "linked_shards": linked,
        "copied_shards": copied,
        "changed": len(native),
        "attached": True,
    }


def _verify_attached(ver: Verifier, family, native: dict[str, torch.Tensor], out_dir: Path) -> None:
    original = ver.checkpoint
    stitched = SafetensorsCheckpoint.open(out_dir)
    expected_map = {**original.weight_map, **dict.fromkeys(native, ATTACHED_SHARD)}
    if stitched.weight_map != expected_map:
        raise CheckpointError("attach verification failed: the index does not list the verifier's and head's tensors.")
    for key, shard in expected_map.items():
        new = stitched.get(key)
        expected = native[key] if key in native else original.get(key)
        if new.dtype != expected.dtype or new.shape != expected.shape or not torch.equal(new, expected):
            what = "head tensor was not written" if key in native else "verifier tensor changed"
            raise CheckpointError(f"attach verification failed: {key} in {shard}: {what}.")
    before, after = read_config_dict(original.root), read_config_dict(out_dir)
    fields = family.attach_config_fields()
    if {k: v for k, v in after.items() if k not in fields} != {k: v for k, v in before.items() if k not in fields}:
        raise CheckpointError("attach verification failed: config.json changed beyond the MTP fields.")
    if any(after.get(k) != v for k, v in fields.items()):
        raise CheckpointError(f"attach verification failed: config.json lacks {fields}.")
    if original.index is None and not (out_dir / SINGLE_NAME).is_file():
        raise CheckpointError(f"attach verification failed: {SINGLE_NAME} is missing from the output.")
