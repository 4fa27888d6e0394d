"""`python -m convert SRC OUT`: a diffusers-layout (or LAVIS) BLIP-Diffusion PyTorch checkpoint to a
self-contained Flax directory. Exit code 0 on success; otherwise non-zero with the reason on one line."""

from __future__ import annotations

import argparse
import os
import sys


def _source_directory(src: str) -> str:
    """SRC as a local directory: itself, or a Hub id's snapshot (through huggingface_hub's cache, as
    `from_pretrained` takes them)."""
    from blipdiff_jax.hub import _snapshot, is_hub_id

    if not is_hub_id(src):
        return src
    snapshot = _snapshot(src)
    if snapshot is None:
        raise FileNotFoundError(f"{src} is no local directory, and as a Hub id it is not in the Hugging Face cache and "
                                f"could not be downloaded (offline?); pass a local directory")
    return snapshot


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    parser.add_argument("src", help="diffusers-layout PyTorch directory (model_index.json, qformer/, unet/, ...), or a Hub "
                        "id such as Salesforce/blipdiffusion (from the Hugging Face cache, else downloaded)")
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
        out = os.path.abspath(args.out)
        # The output is checked before anything is read.
        if os.path.exists(out) and not args.overwrite:
            raise FileExistsError(f"{args.out} already exists; choose a new path or pass --overwrite")
        if os.path.exists(out) and not os.path.isdir(out):
            raise FileExistsError(f"{args.out} is a file, not a directory")
        parent = os.path.dirname(out)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise FileExistsError(f"{args.out}: {parent} is a file, not a directory")
        src = _source_directory(args.src)
        model = read_pytorch_directory(
            src, qformer_tokenizer=args.qformer_tokenizer, controlnet=args.controlnet, lavis_weights=args.lavis, log=print,
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
