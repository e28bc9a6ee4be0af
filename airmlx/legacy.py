"""Opt-in conversion of legacy PyTorch pickle (.bin) checkpoints to safetensors, one file at a time."""
from pathlib import Path


def convert_pickle_checkpoint(bin_files, dst):
    """Convert each .bin to dst/<stem>.safetensors; return the new paths. Needs torch; weights_only
    unpickling refuses code objects, which is why the caller still has to opt in."""
    import pickle
    import zipfile

    import torch
    from safetensors.torch import save_file

    from .errors import CheckpointError

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for path in bin_files:
        # files torch.save wrote before torch 1.6 (no zip archive) cannot be mapped: read whole
        mappable = zipfile.is_zipfile(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mappable)
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
            raise CheckpointError(f"{path}: not a file of weights torch reads safely (weights_only; "
                                  f"{type(e).__name__}); download it again, or use a safetensors checkpoint.") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: holds no plain name -> tensor mapping (a training checkpoint?); use "
                                  "the model's safetensors or pytorch_model.bin weights.")
        target = dst / (Path(path).stem + ".safetensors")
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(target), metadata={"format": "pt"})
        out.append(target)
        del state
    return out
