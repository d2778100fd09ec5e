"""Step 5 of the workflow: write a servable copy of the verifier whose only changed tensors are the `mtp.*` head.

Contract (contracts c6): every head tensor goes back under the verifier's own name, layout (per-expert or
fused experts, as the verifier stores them), dtype and shard; shards without head tensors are hard-linked
(or copied with `copy_untouched=True`, and always copied when linking fails); config.json and the index are
left as they are. After writing, the output is verified tensor by tensor; any failure removes the partial
output and raises.
"""

from __future__ import annotations

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
from mtptune.checkpoint.safetensors_io import SafetensorsCheckpoint
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
    native = _native_head_tensors(family, head_state, ver, checkpoint)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
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
        "stitched %d head tensors (%d changed) into %s; rewrote %s, hard-linked %d, copied %d untouched shards",
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
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True)
        elif entry.suffix == ".safetensors" and not copy_untouched and _try_link(entry, target):
            linked.append(entry.name)
        else:
            shutil.copy2(entry, target)
            if entry.suffix == ".safetensors":
                copied.append(entry.name)
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
