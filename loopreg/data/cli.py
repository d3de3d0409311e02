"""``loopreg data``: data tools. ``loopreg data prepare`` tokenizes a text source once into MDS shards that
``train_data.kind: mds`` reads (see :mod:`loopreg.data.mds`).

    loopreg data prepare monology/pile-uncopyrighted --tokenizer hub:EleutherAI/gpt-neox-20b --seq-len 1280 \\
        --out data/pile_neox_1280/train --workers 16 --compression zstd
"""

from __future__ import annotations

import argparse
import json

from loopreg.errors import ArgumentParser, UserError

__all__ = ["cli_main"]


def _prepare_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="loopreg data prepare",
                     description="Tokenize a text source into fixed-length sequences and write MDS shards.")
    parser.add_argument("source", metavar="SRC",
                        help="a hub dataset id (streamed), or a local .txt/.jsonl/.json/.parquet file or folder")
    parser.add_argument("--tokenizer", required=True, help="byte_level, file:PATH/tokenizer.json or hub:NAME")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per sequence (the recipe's max_seq_len)")
    parser.add_argument("--out", required=True, help="the output folder or remote URI (s3://, gs://, oci://, ...)")
    parser.add_argument("--text-field", default="text", help="the text field of .jsonl/.json/.parquet/hub rows")
    parser.add_argument("--split", default="train", help="the hub dataset's split (default: train)")
    parser.add_argument("--subset", default=None, help="the hub dataset's config name")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    parser.add_argument("--compression", default=None, help="shard compression, e.g. zstd (default: none)")
    parser.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def cli_main(argv: list[str]) -> int:
    """``loopreg data prepare SRC --tokenizer TOK --seq-len N --out DIR_OR_URI [...]``: prints the metadata it wrote."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: loopreg data prepare SRC --tokenizer TOK --seq-len N --out DIR_OR_URI [--text-field F] "
              "[--workers W] [--compression zstd] [--max-tokens N]  (loopreg data prepare -h for more)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command != "prepare":
        raise UserError(f"loopreg data: unknown subcommand '{command}' (known: prepare)")
    args = _prepare_parser().parse_args(rest)
    from loopreg.data.mds import prepare_mds

    meta = prepare_mds(args.source, args.tokenizer, args.seq_len, args.out, text_field=args.text_field,
                       workers=args.workers, compression=args.compression, max_tokens=args.max_tokens,
                       split=args.split, subset=args.subset, progress=False if args.quiet else None)
    print(json.dumps({key: meta[key] for key in ("sequences", "tokens", "shards", "seq_len", "tokenizer")}))
    return 0
