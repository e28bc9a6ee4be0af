"""Opt-in conversion of legacy PyTorch pickle (.bin) checkpoints to safetensors, one file at a time."""
from pathlib import Path


def convert_pickle_checkpoint(bin_files, dst):
    """Convert each .bin to dst/<stem>.safetensors; return the new paths. Needs torch; weights_only
    unpickling refuses code objects, which is why the caller still has to opt in."""
    import torch
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for path in bin_files:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        target = dst / (Path(path).stem + ".safetensors")
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(target), metadata={"format": "pt"})
        out.append(target)
        del state
    return out
