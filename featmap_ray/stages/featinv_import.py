"""`featmap featinv-import CKPT OUT_DIR`: a FeatInv research-code checkpoint -> our diffusers folders."""

from __future__ import annotations

import argparse
import sys

from featmap_ray.stages import base


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the reference's .ckpt (or .safetensors)")
    parser.add_argument("out_dir", help="written: controlnet/ unet/ vae/ text_encoder/ scheduler/ "
                                        "[tokenizer/ model_index.json]")
    parser.add_argument("--backbone", help="backbone the features come from (recorded, checked when sampling)")
    parser.add_argument("--layer", help="its layer")
    parser.add_argument("--tokenizer", help="a CLIP tokenizer folder to copy (e.g. the base model's tokenizer/)")
    parser.add_argument("--pooled", action="store_true", help="the checkpoint is of the pooled variant")


def main(args: argparse.Namespace) -> int:
    from featmap_ray.featinv.convert import CheckpointMismatch, import_ldm_checkpoint

    try:
        out = import_ldm_checkpoint(args.checkpoint, args.out_dir, backbone=args.backbone, layer=args.layer,
                                    tokenizer_dir=args.tokenizer, pooled=args.pooled)
    except (CheckpointMismatch, FileNotFoundError, ValueError) as e:
        print(f"featmap featinv-import: error: {e}", file=sys.stderr)
        return 1
    print(f"[featinv-import] diffusers folders in {out}")
    return 0


STAGE = base.Stage("featinv-import", "convert a FeatInv research-code checkpoint into diffusers folders",
                   details="Reads no config: its arguments are paths.", starts_ray=False, arguments=arguments,
                   main=main)
