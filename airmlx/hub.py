"""Model resolution: a local folder, or a hub id fetched (or found in the cache) by huggingface_hub."""
import glob
import hashlib
import json
import re
from pathlib import Path

from .errors import ModelNotFoundError, OptionError

DEMO_MODEL = Path(__file__).parent / "demo_model"  # the bundled default: a 3.2M-parameter Llama (see demo.py)
# *.py: a checkpoint's own modelling code, run only with trust_remote_code=True
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
# mistralai repos ship a second full copy of the weights in mistral-inference's layout beside the HF shards
HUB_IGNORE = ["consolidated*.safetensors", "consolidated*.pth"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(name):
    """Whether name can only be a hub repo: not a local path, in the hub's spelling, not a .gguf file's name."""
    return not Path(name).expanduser().exists() and bool(HUB_ID.match(str(name))) and not str(name).startswith(".") \
        and not str(name).lower().endswith(".gguf")


def gone_local_gguf(name) -> bool:
    """Whether name is a .gguf file in a local folder that is no longer there (delete_original removes it once
    sharded): its shard folder is named as while it was."""
    path = Path(name).expanduser()
    return path.suffix.lower() == ".gguf" and not path.exists() and path.parent.is_dir()


def refuse_gguf_file_of_a_file(local: Path, gguf_file: "str | None") -> None:
    """gguf_file picks a .gguf from a folder or hub repo; given with a file, it would be ignored."""
    if gguf_file and local.is_file():
        raise OptionError(f"gguf_file={gguf_file!r}: {local} is a file itself; gguf_file picks a .gguf from a hub "
                          "repo or a folder of them, so leave it out.")


def resolve_model(path_or_id, hf_token=None, allow_pickle=False, progress=True, gguf_file=None):
    """Return a local folder holding the model's config, weights and tokenizer, or a local .gguf file
    (a .gguf path; a folder or hub id with gguf_file: only that file is downloaded)."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir() and path.suffix != ".gguf":
            raise ModelNotFoundError(f"{path} is a file; give the folder that holds config.json and the weights.")
        refuse_gguf_file_of_a_file(path, gguf_file)
        return path / gguf_file if gguf_file and path.is_dir() else path
    if not is_hub_id(str(path_or_id)):
        if str(path_or_id).lower().endswith(".gguf"):
            raise ModelNotFoundError(f"{path_or_id}: no such GGUF file; check the path.")
        raise ModelNotFoundError(f"{path_or_id}: no such folder, and it is not a hub id like 'org/name'; check the path.")
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    patterns = HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
    try:
        if gguf_file:  # the config and tokenizer come from the file's own metadata; only that file downloads
            # (snapshot_download, not hf_hub_download: without a network that retried for 24 s before failing)
            local = Path(huggingface_hub.snapshot_download(str(path_or_id), allow_patterns=[glob.escape(gguf_file)],
                                                           token=hf_token)) / gguf_file
            if not local.is_file():
                raise ModelNotFoundError(f"{path_or_id} has no file {gguf_file} (or, offline, the Hugging Face cache "
                                         "lacks it); check gguf_file (--gguf-file) against the repo's files.")
            return local
        # the config and the shard index first: a model airmlx cannot run is refused before its weights download
        head = huggingface_hub.snapshot_download(str(path_or_id), allow_patterns=["config.json", "*.index.json"],
                                                  token=hf_token)
        check_before_download(Path(head), path_or_id, hf_token)
        local = huggingface_hub.snapshot_download(str(path_or_id), allow_patterns=patterns, ignore_patterns=HUB_IGNORE,
                                                   token=hf_token)
    except GatedRepoError:
        raise ModelNotFoundError(f"{path_or_id} is gated: accept its licence on the Hugging Face hub, then pass "
                                 "hf_token=... (or --hf-token, or set HF_TOKEN).") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{path_or_id}: no such model on the Hugging Face hub (or it is private: pass "
                                 "hf_token=...); check the id.") from None
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(f"{path_or_id} is not in the Hugging Face cache and the hub cannot be reached "
                                 "(HF_HUB_OFFLINE is set or there is no network); download it once while "
                                 "online, or give a local folder.") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"{path_or_id}: download failed ({e}); check the network, or give a local folder.") from None
    return Path(local)


def check_before_download(folder: Path, repo_id, token=None) -> None:
    """A repo's config.json and shard index (all that `folder` may hold): an architecture airmlx does not run, or
    weights quantised in a format it does not read, is a one-line error before gigabytes download."""
    from .archs import arch_for
    from .sharder import load_config, refuse_foreign_quantization
    if not (folder / "config.json").is_file():
        return  # the full download says what is missing
    config = load_config(folder)
    arch_for(config)
    try:
        names = dict.fromkeys(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    except (OSError, ValueError, KeyError, TypeError):  # one weights file (or a damaged index): ask for its header
        names = remote_tensor_dtypes(repo_id, token)
    refuse_foreign_quantization(config, names, repo_id)


def remote_tensor_dtypes(repo_id, token=None) -> dict:
    """{tensor name: dtype} of a hub repo's safetensors weights, read from their headers by range requests; {}
    offline, or where the hub cannot say (the full download then says what is wrong)."""
    import huggingface_hub
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return {}
    try:
        meta = huggingface_hub.get_safetensors_metadata(str(repo_id), token=token)
    except Exception:  # not a safetensors repo, no network, a refusal: none of them is this check's to report
        return {}
    return {name: info.dtype for file in meta.files_metadata.values() for name, info in file.tensors.items()}


def default_shard_dir(path_or_id, compression=None):
    """$HF_HOME/airmlx/<name>[-<compression>]: hub ids by name, local folders by name plus a path hash."""
    from huggingface_hub import constants
    path = Path(path_or_id).expanduser()
    if path.exists() or gone_local_gguf(path):
        resolved = str(path.resolve())
        name = f"{path.resolve().name}-{hashlib.sha1(resolved.encode()).hexdigest()[:8]}"
    else:
        name = str(path_or_id).replace("/", "--")
    if compression:
        from .quant import compression_name
        name += f"-{compression_name(compression)}"
    return Path(constants.HF_HOME) / "airmlx" / name
