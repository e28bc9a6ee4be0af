"""`python -m airmlx.shard`: split a checkpoint into one file per stage, or check and repair a shard folder.

    python -m airmlx.shard SRC [OUT] [--compression 4bit|8bit] [--delete-original] [--allow-pickle]
    python -m airmlx.shard --verify SHARD_FOLDER     # every stage's checksum; exit status 1 if any is damaged
    python -m airmlx.shard --repair SHARD_FOLDER     # rebuild damaged stages from the recorded checkpoint
    python -m airmlx.shard SRC OUT --hosts N --rank R [--pipeline-split 9,9]   # only host R's stages of a pipeline
"""
import sys

from .cli import ArgumentParser, face
from .quant import COMPRESSIONS


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m airmlx.shard",
                            description="Split a Hugging Face checkpoint into one file per layer.")
    parser.add_argument("src", nargs="?", help="model folder or hub id")
    parser.add_argument("out", nargs="?", help="shard folder (default: under the Hugging Face cache)")
    parser.add_argument("--delete-original", action="store_true",
                        help="delete the source weight files once every stage is written and verified")
    parser.add_argument("--allow-pickle", action="store_true", help="convert legacy pickle .bin checkpoints")
    parser.add_argument("--hf-token", default=None, help="token for gated hub models")
    parser.add_argument("--compression", choices=sorted(COMPRESSIONS), default=None,
                        help="quantise linear and embedding weights (MLX affine layout, group size 64)")
    parser.add_argument("--hosts", type=int, default=1,
                        help="a pipeline over this many hosts (mlx.launch / torchrun): OUT gets only the stage files "
                             "of host --rank, and its manifest says which host holds what")
    parser.add_argument("--rank", type=int, default=0, help="with --hosts: the host whose stages OUT gets (0 .. N-1)")
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
    args = parser.parse_args(argv)
    if args.repair or args.verify:
        if args.src:
            parser.error("--verify and --repair take the shard folder; give no SRC")
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
    from .hub import default_shard_dir, resolve_model
    from .sharder import shard_checkpoint
    src = resolve_model(args.src, hf_token=args.hf_token, allow_pickle=args.allow_pickle)
    out = args.out or default_shard_dir(args.src, args.compression)
    shard_checkpoint(src, out, delete_original=args.delete_original, allow_pickle=args.allow_pickle,
                     compression=args.compression, hosts=args.hosts, rank=args.rank, pipeline_split=args.pipeline_split)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
