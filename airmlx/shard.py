"""`python -m airmlx.shard`: split a checkpoint into one file per stage, or check and repair a shard folder.

    python -m airmlx.shard SRC [OUT] [--compression 4bit|8bit[-gNN][-gptq]] [--delete-original] [--allow-pickle]
    python -m airmlx.shard model.Q4_1.gguf [OUT]    # a GGUF file (or --gguf-file NAME from a folder or hub repo)
    python -m airmlx.shard --verify SHARD_FOLDER     # every stage's checksum; exit status 1 if any is damaged
    python -m airmlx.shard --repair SHARD_FOLDER     # rebuild damaged stages from the recorded checkpoint
    python -m airmlx.shard SRC OUT --hosts N --rank R [--pipeline-split 9,9]   # only host R's stages of a pipeline
"""
import sys
from pathlib import Path

from .cli import ArgumentParser, compression_option, face


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m airmlx.shard",
                            description="Split a Hugging Face checkpoint into one file per layer.")
    parser.add_argument("src", nargs="?", help="model folder, hub id or .gguf file")
    parser.add_argument("out", nargs="?", help="shard folder (default: under the Hugging Face cache)")
    parser.add_argument("--delete-original", action="store_true",
                        help="delete the source weight files once every stage is written and verified")
    parser.add_argument("--allow-pickle", action="store_true", help="convert legacy pickle .bin checkpoints")
    parser.add_argument("--hf-token", default=None, help="token for gated hub models")
    parser.add_argument("--compression", default=None, type=compression_option,
                        help="quantise linear and embedding weights (MLX affine layout): 4bit or 8bit (group size "
                             "64), optionally -g32/-g128 and -gptq (calibrated), e.g. 4bit-g32-gptq")
    parser.add_argument("--gguf-file", default=None, help="the .gguf file to use from a hub repo or folder")
    parser.add_argument("--hosts", type=int, default=1,
                        help="a pipeline over this many hosts (mlx.launch / torchrun): OUT gets only the stage files "
                             "of host --rank, and its manifest says which host holds what")
    parser.add_argument("--rank", type=int, default=None,
                        help="with --hosts: the host whose stages OUT gets (0 .. N-1)")
    parser.add_argument("--pipeline-split", default=None,
                        help="with --hosts: stages per host, e.g. 9,9 (default: balanced by bytes)")
    check = parser.add_mutually_exclusive_group()
    check.add_argument("--verify", metavar="SHARD_FOLDER", help="check every stage's checksum of a shard folder")
    check.add_argument("--repair", metavar="SHARD_FOLDER",
                       help="rebuild a shard folder's damaged stages from the checkpoint it was made from")
    return parser


@face
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # SRC OUT may come after the options
    if args.repair or args.verify:
        if args.src:
            parser.error("--verify and --repair take the shard folder; give no SRC")
        sharding = [o for o, v in (("--compression", args.compression), ("--gguf-file", args.gguf_file),
                                   ("--hosts", args.hosts != 1), ("--rank", args.rank is not None),
                                   ("--pipeline-split", args.pipeline_split), ("--delete-original", args.delete_original),
                                   ("--allow-pickle", args.allow_pickle)) if v]
        if sharding:
            parser.error(f"{sharding[0]} is for sharding; --verify and --repair take only the shard folder")
        folder = args.repair or args.verify
        if not Path(folder).is_dir():
            parser.error(f"{folder}: no such folder; give the shard folder to check")
        from .manifest import verify_folder
        from .repair import repair_stages
        if args.repair:
            fixed = repair_stages(args.repair)
            print(f"{args.repair}: {f'rebuilt {fixed}' if fixed else 'OK'}")
            return 0
        problems = verify_folder(args.verify)
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{args.verify}: {'OK' if not problems else f'{len(problems)} damaged stage(s)'}")
        return 1 if problems else 0
    if not args.src:
        parser.error("give the model to shard (SRC), or --verify / --repair SHARD_FOLDER")
    if (args.hosts != 1) != (args.rank is not None):
        parser.error("--hosts N and --rank R go together: OUT gets host R's stages of a pipeline over N hosts")
    if args.pipeline_split is not None and args.hosts == 1:
        parser.error("--pipeline-split splits the stages between the hosts of --hosts N --rank R; leave it out for "
                     "one host")
    from .hub import default_shard_dir, resolve_model
    from .quant import compression_config
    from .sharder import shard_checkpoint
    if args.compression is not None:
        compression_config(args.compression)  # one line for an unknown spelling, before any download
    src = resolve_model(args.src, hf_token=args.hf_token, allow_pickle=args.allow_pickle, gguf_file=args.gguf_file)
    out = args.out or default_shard_dir(f"{args.src}/{args.gguf_file}" if args.gguf_file else args.src,
                                        args.compression)
    shard_checkpoint(src, out, delete_original=args.delete_original, allow_pickle=args.allow_pickle,
                     compression=args.compression, hosts=args.hosts, rank=args.rank or 0,
                     pipeline_split=args.pipeline_split)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
