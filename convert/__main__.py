"""`python -m convert SRC OUT`: a diffusers-layout (or LAVIS) BLIP-Diffusion PyTorch checkpoint to a
self-contained Flax directory. Exit code 0 on success; otherwise non-zero with the reason on one line."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    parser.add_argument("src", help="diffusers-layout PyTorch directory (model_index.json, qformer/, unet/, ...)")
    parser.add_argument("out", help="new directory for the converted Flax model (must not exist)")
    parser.add_argument("--qformer-tokenizer", metavar="PATH", help="local BERT tokenizer folder for the Q-Former")
    parser.add_argument("--controlnet", metavar="PATH", help="an SD 1.5 ControlNet directory to add")
    parser.add_argument("--lavis", metavar="CKPT", help="take the weights from this LAVIS BLIP-Diffusion checkpoint "
                        "(a state-dict file or LAVIS's released folder); SRC then supplies configs and tokenizers")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once the new one is complete)")
    args = parser.parse_args(argv)

    from blipdiff_jax.checkpoint import save_converted

    from .pytorch_dir import read_pytorch_directory

    try:
        model = read_pytorch_directory(
            args.src, qformer_tokenizer=args.qformer_tokenizer, controlnet=args.controlnet, lavis_weights=args.lavis, log=print,
            progress=True,
        )
        out = save_converted(model, args.out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
