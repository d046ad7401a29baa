"""Command line: `neuraldict collect | fit | validate | export | allocate | compare ...` and the `lightning` console script.

`lightning fit --config configs/llama.yaml` and `neuraldict fit --config configs/llama.yaml` are the
same LightningCLI. The other subcommands are plain functions; jsonargparse builds their flags (and
`--config` YAML support) from their signatures and docstrings.
"""

from __future__ import annotations

import sys

_LIGHTNING_SUBCOMMANDS = {"fit", "validate", "test", "predict"}


def export(ckpt_path: str, output: str | None = None) -> None:
    """Write the dictionary file of a NeuralDict checkpoint (any epoch, e.g. last.ckpt).

    Args:
        ckpt_path: a checkpoint written by `lightning fit --config configs/llama.yaml`.
        output: where to write (default: next to the checkpoint, with the .safetensors suffix).
    """
    from neuraldict.export import export_checkpoint

    print(export_checkpoint(ckpt_path, output))


def push(dictionary: str, repo: str, private: bool = False, api=None) -> str:
    """Upload a dictionary file and its model card to the Hugging Face Hub (needs network and a login).

    Args:
        dictionary: the dictionary file (its card, `<name>.card.md`, is written next to it if missing).
        repo: the Hub repository, `org/name` (created if it does not exist).
        private: create the repository private.
    Returns the repository URL. Load it back with `CSRCache(model, "org/name")`.
    """
    from huggingface_hub import HfApi

    from csr_core.dictionary_file import HUB_FILENAME, load_dictionary
    from neuraldict.model_card import card_path, write_card

    loaded = load_dictionary(dictionary)  # a broken file is refused before anything is uploaded
    card = card_path(dictionary)
    if not card.is_file():
        write_card(dictionary, loaded)
    api = api or HfApi()
    url = api.create_repo(repo, private=private, exist_ok=True)
    api.upload_file(path_or_fileobj=str(dictionary), path_in_repo=HUB_FILENAME, repo_id=repo)
    api.upload_file(path_or_fileobj=str(card), path_in_repo="README.md", repo_id=repo)
    print(f"Pushed {dictionary} to {url}; load it with CSRCache(model, {repo!r})")
    return str(url)


def fit(config: str = "configs/llama.yaml") -> None:
    """Train the dictionaries (LightningCLI; `neuraldict fit --help` lists every option): collection, merging,
    NeuralDict training and export of the dictionary file. The same as `lightning fit --config ...`.

    Args:
        config: the experiment's YAML (configs/llama.yaml is the embedded default).
    """
    lightning_main(["fit", "--config", config])


def lightning_main(args: list[str] | None = None) -> None:
    """The `lightning` console script: a LightningCLI over NeuralDict and the KV DataModule."""
    import torch.distributed

    from neuraldict.training import run_lightning_cli

    run_lightning_cli(args)
    # Lightning leaves a DDP run's process group alive; torch aborts a process that exits with gloo's threads
    # still running ("terminate called without an active exception"), so every rank closes it on success.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _LIGHTNING_SUBCOMMANDS:
        return lightning_main(argv)
    from jsonargparse import CLI

    from neuraldict.allocate import allocate
    from neuraldict.collect import collect_kv
    from neuraldict.compare import compare

    # "fit" and the other Lightning subcommands are routed above; listed here so that --help shows them
    CLI({"fit": fit, "collect": collect_kv, "export": export, "allocate": allocate, "compare": compare, "push": push},
        args=argv, as_positional=False)


if __name__ == "__main__":
    main()
