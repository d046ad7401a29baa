"""Command line: `neuraldict collect | fit | validate | export ...` and the `lightning` console script.

`lightning fit --config configs/llama.yaml` and `neuraldict fit --config configs/llama.yaml` are the
same LightningCLI. The other subcommands are plain functions; jsonargparse builds their flags (and
`--config` YAML support) from their signatures and docstrings.
"""

from __future__ import annotations

import sys

_LIGHTNING_SUBCOMMANDS = {"fit", "validate", "test", "predict"}


def collect(
    model: str = "smollm2-135m-instruct",
    corpus: str = "python-docs",
    split: str = "train",
    max_tokens: int = 16384,
    window: int = 512,
    batch_size: int = 4,
    windows_per_shard: int = 8,
    output_root: str | None = None,
    device: str = "cpu",
) -> None:
    """Collect pre-RoPE keys and values of every layer into fp16 shards (resumable).

    Args:
        model: Hugging Face id, local folder, or the embedded default.
        corpus: "python-docs" (embedded), "hf:<dataset>[:<config>]", or a text file / folder / glob.
        split: document split to read: train, validation or test.
        max_tokens: token budget.
        window: tokens per forward pass.
        batch_size: windows per forward pass.
        windows_per_shard: windows per shard file (the unit of resumption).
        output_root: folder for collections (default: the cache's kv/ folder).
        device: cpu or cuda.
    """
    from neuraldict.collect import collect_kv

    collection = collect_kv(
        model=model, corpus=corpus, split=split, max_tokens=max_tokens, window=window,
        batch_size=batch_size, windows_per_shard=windows_per_shard, output_root=output_root, device=device,
    )
    print(collection)


def export(ckpt_path: str, output: str | None = None) -> None:
    """Write the dictionary file of a NeuralDict checkpoint (any epoch, e.g. last.ckpt).

    Args:
        ckpt_path: a checkpoint written by `lightning fit --config configs/llama.yaml`.
        output: where to write (default: next to the checkpoint, with the .safetensors suffix).
    """
    from neuraldict.export import export_checkpoint

    print(export_checkpoint(ckpt_path, output))


def lightning_main(args: list[str] | None = None) -> None:
    """The `lightning` console script: a LightningCLI over NeuralDict and the KV DataModule."""
    from neuraldict.training import run_lightning_cli

    run_lightning_cli(args)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _LIGHTNING_SUBCOMMANDS:
        return lightning_main(argv)
    from jsonargparse import CLI

    CLI({"collect": collect, "export": export}, args=argv, as_positional=False)


if __name__ == "__main__":
    main()
